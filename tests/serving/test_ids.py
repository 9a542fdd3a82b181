"""recsys.serving.ids: raw ids <-> internal ids, typed, with placeholders for strings nobody knows."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.serving.ids import IdError, IdMap, IdMaps


def _maps() -> IdMaps:
    return IdMaps(
        users=IdMap.from_pairs("user", ["bob", "alice"], [2, 1]),
        items=IdMap.from_pairs("item", ["sku-b", "sku-a", "sku-c"], [20, 10, 30]),
    )


def test_string_ids_translate_both_ways() -> None:
    ids = _maps()
    assert ids.user_type == "str" and ids.item_type == "str"
    assert ids.user_internal("alice") == 1 and ids.user_internal("carol") is None
    assert ids.user_raw(2) == "bob" and ids.user_raw(None) is None
    got = ids.items_internal(["sku-c", "new", "sku-a", "new", "other"], "history.item_id")
    assert got.internal.tolist() == [30, -1, 10, -1, -2]  # unknown strings share a placeholder per value
    assert ids.items_raw(got.internal, got.unknown) == ["sku-c", "new", "sku-a", "new", "other"]
    assert ids.items_raw(np.array([99])) == [None]


def test_integer_ids_are_their_own_internal_ids() -> None:
    ids = IdMaps()
    assert ids.user_internal(7) == 7 and ids.user_raw(7) == 7
    assert ids.items_internal([5, -3], "candidates").internal.tolist() == [5, -3]
    assert ids.items_raw(np.array([5, 6])) == [5, 6]


@pytest.mark.parametrize(
    ("ids", "call", "message"),
    [
        (
            _maps(),
            lambda m: m.user_internal(1),
            "user_id: this model's user ids are strings; got an integer 1",
        ),
        (_maps(), lambda m: m.items_internal(["sku-a", 3], "candidates"), "candidates: .* got an integer 3"),
        (
            IdMaps(),
            lambda m: m.user_internal("u1"),
            "user_id: this model's user ids are integers; got a string",
        ),
        (IdMaps(), lambda m: m.items_internal([1, "a"], "candidates"), "are integers; got a string 'a'"),
    ],
)
def test_a_wrong_type_names_the_field(ids: IdMaps, call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(IdError, match=message):
        call(ids)


def test_maps_refuse_contradictions() -> None:
    with pytest.raises(ValueError, match="raw id appears twice"):
        IdMap.from_pairs("item", ["a", "a"], [1, 2])
    with pytest.raises(ValueError, match="internal id appears twice"):
        IdMap.from_pairs("item", ["a", "b"], [1, 1])
    one = IdMaps(items=IdMap.from_pairs("item", ["a", "b"], [1, 2]))
    assert one.merged(IdMaps(items=IdMap.from_pairs("item", ["c"], [3]))).items.to_internal == {  # type: ignore[union-attr]
        "a": 1,
        "b": 2,
        "c": 3,
    }
    with pytest.raises(IdError, match="'a' is internal id 1 in one model, 5 in the other"):
        one.merged(IdMaps(items=IdMap.from_pairs("item", ["a"], [5])))
    with pytest.raises(IdError, match="disagree"):
        one.check_item_type(IdMaps())
