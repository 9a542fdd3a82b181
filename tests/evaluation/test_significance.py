"""Seed summaries and paired tests: values agree with scipy, every result names its test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from recsys.evaluation.significance import paired_t_over_seeds, paired_tests_over_users, summarize


def test_summary_mean_and_sample_std() -> None:
    s = summarize([0.1, 0.2, 0.3])
    assert s.mean == pytest.approx(0.2) and s.std == pytest.approx(0.1) and s.n == 3
    assert s.format(2) == "0.20 ± 0.10"
    assert summarize([0.5]).std == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_paired_t_over_seeds_matches_scipy() -> None:
    a, b = [0.30, 0.32, 0.31], [0.28, 0.29, 0.30]
    t = paired_t_over_seeds(a, b, metric="ndcg@10", a_name="hstu", b_name="sasrec")
    ref = stats.ttest_rel(a, b)
    assert t.test == "paired t-test over seeds"
    assert t.statistic == pytest.approx(ref.statistic) and t.p_value == pytest.approx(ref.pvalue)
    assert t.mean_diff == pytest.approx(np.mean(a) - np.mean(b))
    assert "hstu vs sasrec" in t.format() and "paired t-test over seeds" in t.format()


def test_one_seed_gives_no_p_value() -> None:
    t = paired_t_over_seeds([0.3], [0.2], metric="hr@10", a_name="a", b_name="b")
    assert np.isnan(t.p_value) and "p=n/a" in t.format()


def test_user_level_tests() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(200)
    a = b + 0.05 + 0.01 * rng.standard_normal(200)
    wilcoxon, ttest = paired_tests_over_users(a, b, metric="ndcg@10", a_name="a", b_name="b")
    assert wilcoxon.test == "Wilcoxon signed-rank over users" and wilcoxon.p_value < 1e-6
    assert ttest.test == "paired t-test over users"
    assert ttest.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue)
    same = paired_tests_over_users(b, b, metric="ndcg@10", a_name="a", b_name="b")
    assert [t.p_value for t in same] == [1.0, 1.0]


def test_unpaired_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="equal length"):
        paired_t_over_seeds([1.0, 2.0], [1.0], metric="m", a_name="a", b_name="b")
