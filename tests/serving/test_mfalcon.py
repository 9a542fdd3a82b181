"""M-FALCON: cached-K/V candidate scoring equals the full forward pass with the candidates appended
(``recsys.models.ops.hstu_attention`` with ``num_candidates``) and the naive per-candidate forward passes."""

from __future__ import annotations

import pytest
import torch

from recsys.models.hstu import HSTU
from recsys.models.registry import build_model
from recsys.models.sequential import last_valid
from recsys.serving.mfalcon import (
    MFalconScorer,
    TargetDotHead,
    UserDotHead,
    candidate_states,
    encode_history,
    encode_user,
    history_query_ts,
    naive_candidate_states,
    reference_candidate_states,
    truncate_history,
)

NUM_ITEMS = 40


def _model(max_len: int = 12, use_time_bias: bool = True, num_blocks: int = 2) -> HSTU:
    torch.manual_seed(0)
    model = build_model(
        "hstu",
        num_items=NUM_ITEMS,
        max_len=max_len,
        embedding_dim=16,
        num_heads=2,
        dqk=8,
        dv=8,
        dropout=0.0,
        use_time_bias=use_time_bias,
        num_blocks=num_blocks,
    )
    # Untrained bias tables are ~0.02: make them large so a wrong position or time bucket shows up.
    for block in model.blocks:
        torch.nn.init.normal_(block.pos_weight, std=0.5)
        if block.ts_weight is not None:
            torch.nn.init.normal_(block.ts_weight, std=0.5)
    assert isinstance(model, HSTU)
    return model.eval()


def _histories() -> tuple[torch.Tensor, ...]:
    """Three ragged histories (5 items, 7 items, empty), times spanning many buckets, and request times."""
    items = torch.tensor([[3, 4, 5, 6, 7, 0, 0], [1, 2, 3, 4, 5, 6, 7], [0] * 7])
    ts = torch.tensor([[10, 200, 3000, 40000, 500000, 0, 0], [1, 5, 50, 500, 5000, 50000, 500000], [0] * 7])
    lengths = torch.tensor([5, 7, 0])
    request_ts = torch.tensor([600_000, 10**8, 99])
    return items, ts, lengths, request_ts


@pytest.mark.parametrize("use_time_bias", [True, False])
@pytest.mark.parametrize("micro_batch", [1, 4, 100])
def test_cached_scoring_equals_the_full_forward_with_candidates_appended(
    micro_batch: int, use_time_bias: bool
) -> None:
    model = _model(use_time_bias=use_time_bias)
    items, ts, lengths, request_ts = _histories()
    candidates = torch.randint(1, NUM_ITEMS + 1, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = encode_history(model, items, ts, lengths, request_ts)
        cached = candidate_states(model, cache, candidates, micro_batch=micro_batch)
        full = reference_candidate_states(model, items, ts, lengths, request_ts, candidates)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    assert cached.shape == (3, 9, 16)


def test_cached_scoring_equals_naive_per_candidate_scoring() -> None:
    model = _model()
    items, ts, lengths, request_ts = _histories()
    candidates = torch.randint(1, NUM_ITEMS + 1, (3, 6), generator=torch.Generator().manual_seed(2))
    scorer = MFalconScorer(model, TargetDotHead(temperature=0.05), micro_batch=4)
    with torch.no_grad():
        fast = scorer.score(items, ts, lengths, request_ts, candidates)["score"]  # [3, 6]
        for row in range(3):
            n = max(int(lengths[row]), 1)
            naive = naive_candidate_states(
                model,
                items[row : row + 1, :n],
                ts[row : row + 1, :n],
                lengths[row : row + 1],
                request_ts[row : row + 1],
                candidates[row : row + 1],
                batch=2,
            )[0]  # [6, D]
            expected = (naive * model.item_vectors()[candidates[row]]).sum(-1) / 0.05
            torch.testing.assert_close(fast[row], expected, rtol=1e-5, atol=1e-5)


def test_one_candidate_is_an_ordinary_forward_pass_over_history_plus_candidate() -> None:
    """With m = 1 the M-FALCON sequence is the plain causal sequence: the model's own forward must agree."""
    model = _model()
    items = torch.tensor([[3, 4, 5, 6, 9]])
    ts = torch.tensor([[10, 200, 3000, 40000, 500000]])
    request = torch.tensor([700_000])
    with torch.no_grad():
        cache = encode_history(model, items, ts, torch.tensor([5]), request)
        state = candidate_states(model, cache, torch.tensor([[17]]))[0, 0]
        seq = torch.tensor([[3, 4, 5, 6, 9, 17]])
        seq_ts = torch.tensor([[10, 200, 3000, 40000, 500000, 700_000]])
        query_ts = history_query_ts(seq_ts, torch.tensor([6]), request)
        out = model(seq, seq_ts, query_ts, torch.tensor([6]))
    torch.testing.assert_close(state, out[0, 5], rtol=1e-5, atol=1e-6)
    # ... and the cached user vector is the model's output at the last history position.
    torch.testing.assert_close(cache.user[0], out[0, 4], rtol=1e-5, atol=1e-6)


def test_user_vector_matches_the_model_on_ragged_histories() -> None:
    model = _model()
    items, ts, lengths, request_ts = _histories()
    with torch.no_grad():
        cache = encode_history(model, items, ts, lengths, request_ts)
        out = model(items, ts, history_query_ts(ts, lengths, request_ts), lengths)
    torch.testing.assert_close(cache.user[:2], last_valid(out, lengths)[:2], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(cache.user[2]) == 0  # no history: no user vector


@pytest.mark.parametrize("num_blocks", [1, 3])
@pytest.mark.parametrize("use_time_bias", [True, False])
def test_user_vector_from_the_last_query_alone_equals_the_full_encoding(
    num_blocks: int, use_time_bias: bool
) -> None:
    model = _model(use_time_bias=use_time_bias, num_blocks=num_blocks)
    items, ts, lengths, request_ts = _histories()
    items, ts, lengths = items[[0, 1, 2, 0]], ts[[0, 1, 2, 0]], torch.tensor([5, 7, 0, 1])
    with torch.no_grad():
        full = encode_history(model, items, ts, lengths, request_ts[[0, 1, 2, 0]]).user
        fast = encode_user(model, items, ts, lengths, request_ts[[0, 1, 2, 0]])
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(fast[2]) == 0 and torch.count_nonzero(fast[3]) > 0


def test_user_head_skips_the_candidate_pass_and_gives_retrieval_scores() -> None:
    model = _model()
    items, ts, lengths, request_ts = _histories()
    candidates = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    with torch.no_grad():
        scores = MFalconScorer(model, UserDotHead(temperature=0.5)).score(
            items, ts, lengths, request_ts, candidates
        )
        user = last_valid(model(items, ts, history_query_ts(ts, lengths, request_ts), lengths), lengths)
    expected = torch.einsum("bd,bmd->bm", user, model.item_vectors()[candidates]) / 0.5
    torch.testing.assert_close(scores["score"], expected, rtol=1e-5, atol=1e-6)


def test_long_histories_keep_their_most_recent_items_and_leave_the_candidate_slot() -> None:
    model = _model(max_len=6)
    items = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 0, 0, 0, 0, 0, 0]])
    ts = torch.arange(1, 9).expand(2, 8) * torch.tensor([[1], [1]])
    lengths = torch.tensor([8, 2])
    short_items, short_ts, short_lengths = truncate_history(items, ts, lengths, 5)
    assert short_items.tolist() == [[4, 5, 6, 7, 8], [9, 10, 0, 0, 0]]
    assert short_lengths.tolist() == [5, 2]
    with pytest.raises(ValueError, match="max_len - 1"):
        encode_history(model, items, ts, lengths, torch.tensor([9, 9]))
    with torch.no_grad():  # the scorer truncates by itself: same scores as on the truncated history
        candidates = torch.tensor([[11, 12], [13, 14]])
        scorer = MFalconScorer(model, TargetDotHead())
        torch.testing.assert_close(
            scorer.score(items, ts, lengths, torch.tensor([9, 9]), candidates)["score"],
            scorer.score(short_items, short_ts, short_lengths, torch.tensor([9, 9]), candidates)["score"],
        )


def test_padding_candidates_come_out_zero_and_bad_arguments_are_named() -> None:
    model = _model()
    items, ts, lengths, request_ts = _histories()
    with torch.no_grad():
        cache = encode_history(model, items, ts, lengths, request_ts)
        states = candidate_states(model, cache, torch.tensor([[5, 0], [6, 7], [0, 0]]))
    assert torch.count_nonzero(states[0, 1]) == 0 and torch.count_nonzero(states[2]) == 0
    with pytest.raises(ValueError, match="micro_batch"):
        candidate_states(model, cache, torch.tensor([[1], [2], [3]]), micro_batch=0)
    with pytest.raises(ValueError, match="rows"):
        candidate_states(model, cache, torch.tensor([[1]]))
