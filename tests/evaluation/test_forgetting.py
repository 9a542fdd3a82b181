"""The forgetting matrix and its summary on a toy case computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.evaluation.forgetting import forgetting_matrix, format_matrix, summarize_forgetting

# AUC after step i (rows) on period j (columns); period 1 improves at step 2 before it is forgotten.
TOY = {
    (1, 1): 0.80,
    (2, 1): 0.85,
    (2, 2): 0.90,
    (3, 1): 0.60,
    (3, 2): 0.85,
    (3, 3): 0.75,
}


def test_toy_matrix_and_summary_match_the_hand_computation() -> None:
    m = forgetting_matrix(TOY)
    assert m.shape == (3, 3)
    assert m[1, 0] == 0.85 and m[2, 2] == 0.75
    assert np.isnan(m[0, 1]) and np.isnan(m[0, 2]) and np.isnan(m[1, 2])

    s = summarize_forgetting(m)
    assert s.new_period_auc == pytest.approx((0.80 + 0.90 + 0.75) / 3)
    assert s.average_final_auc == pytest.approx((0.60 + 0.85 + 0.75) / 3)
    # best earlier AUC - final AUC: period 1 max(0.80, 0.85) - 0.60, period 2 0.90 - 0.85
    assert s.average_forgetting == pytest.approx(((0.85 - 0.60) + (0.90 - 0.85)) / 2)
    # BWT compares with the AUC right after learning: (0.60 - 0.80 + 0.85 - 0.90) / 2
    assert s.backward_transfer == pytest.approx(((0.60 - 0.80) + (0.85 - 0.90)) / 2)


def test_rows_as_triples_give_the_same_matrix_and_one_period_has_no_forgetting() -> None:
    triples = [(s, p, a) for (s, p), a in TOY.items()]
    np.testing.assert_array_equal(forgetting_matrix(triples), forgetting_matrix(TOY))
    one = summarize_forgetting(forgetting_matrix({(1, 1): 0.7}))
    assert one.new_period_auc == 0.7 and one.average_final_auc == 0.7
    assert math.isnan(one.average_forgetting) and math.isnan(one.backward_transfer)


def test_bad_cells_are_named() -> None:
    with pytest.raises(ValueError, match="eval_period 2 of step 1"):
        forgetting_matrix({**TOY, (1, 2): 0.5})
    missing = {k: v for k, v in TOY.items() if k != (3, 2)}
    with pytest.raises(ValueError, match=r"missing cells .*\(3, 2\)"):
        forgetting_matrix(missing)
    with pytest.raises(ValueError, match="given twice"):
        forgetting_matrix([(1, 1, 0.7), (1, 1, 0.8)])
    with pytest.raises(ValueError, match="non-finite"):
        forgetting_matrix({(1, 1): float("nan")})
    with pytest.raises(ValueError, match="outside 1..2"):
        forgetting_matrix({(1, 1): 0.7, (3, 1): 0.7}, n_periods=2)
    with pytest.raises(ValueError, match="missing cells"):
        summarize_forgetting(np.array([[0.7, np.nan], [np.nan, 0.8]]))


def test_markdown_leaves_the_cells_above_the_diagonal_blank() -> None:
    text = format_matrix(forgetting_matrix(TOY))
    lines = text.splitlines()
    assert lines[0] == "| after step | period 1 | period 2 | period 3 |"
    assert lines[2] == "| 1 | 0.8000 |  |  |"
    assert lines[4] == "| 3 | 0.6000 | 0.8500 | 0.7500 |"
