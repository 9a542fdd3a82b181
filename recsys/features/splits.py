"""Evaluation splits (shared/specs/evaluation.md): deterministic, recorded in lineage with the data version.

- Retrieval, leave-one-out: ``<ds>.split_loo(user_id, user_idx, n_events, valid_pos, test_pos)``, positions
  0-based into ``<ds>.sequences``: the last event (by ``(ts, src_row)``) is the test target, the one before it
  the validation target; training sees ``item_idx[:valid_pos]``. Users with fewer than
  ``FeatureConfig.loo_min_events`` (3) events have NULL positions and are training-only.
- Ranking, global temporal cut: ``train: ts < t1 <= valid: ts < t2 <= test``. ``t1, t2`` are the discrete
  quantiles ``FeatureConfig.split_quantiles`` of the examples' ``ts`` (OPEN in the spec: picked 0.8 / 0.9);
  they go into the ``params`` of the ``<ds>.examples`` lineage row next to the input versions.
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys.features.config import FeatureConfig
from recsys.features.sequences import check_dataset, publish_if_stale, require_table
from recsys.warehouse import TableVersion, Warehouse

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class TemporalCut:
    t1: int
    t2: int
    q1: float
    q2: float

    def case_sql(self, ts: str = "ts") -> str:
        """SQL expression giving 'train' / 'valid' / 'test' for a timestamp column."""
        return f"CASE WHEN {ts} < {self.t1} THEN 'train' WHEN {ts} < {self.t2} THEN 'valid' ELSE 'test' END"

    def params(self) -> dict[str, object]:
        return {"protocol": "global-temporal-cut", "t1": self.t1, "t2": self.t2, "q1": self.q1, "q2": self.q2}


def temporal_cut(wh: Warehouse, source_sql: str, config: FeatureConfig) -> TemporalCut:
    """The cut points from the ``ts`` of ``source_sql`` (the example rows); every split must be non-empty."""
    q1, q2 = config.split_quantiles
    row = wh.con.execute(
        f"SELECT quantile_disc(ts, {q1}), quantile_disc(ts, {q2}), min(ts), count(*) FROM ({source_sql})"
    ).fetchall()[0]
    t1, t2, t_min, n = row
    if not n:
        raise ValueError("no examples to split: the example source is empty")
    if t1 <= t_min or t1 >= t2:
        # Heavy timestamp ties can collapse quantiles; a split that is silently empty would mislead.
        raise ValueError(
            f"split_quantiles {config.split_quantiles} give t1={t1}, t2={t2} (min ts {t_min}) on {n}"
            " examples: a split would be empty; choose other quantiles"
        )
    return TemporalCut(t1=int(t1), t2=int(t2), q1=q1, q2=q2)


def build_split_loo(wh: Warehouse, dataset: str, config: FeatureConfig) -> TableVersion:
    """``<ds>.split_loo``: leave-one-out target positions per user, from ``<ds>.sequences``."""
    check_dataset(dataset)
    seq = f"{dataset}.sequences"
    inputs = {seq: require_table(wh, seq, ("user_id", "user_idx", "item_idx"))}
    k = config.loo_min_events
    sql = f"""
        SELECT user_id, user_idx, len(item_idx)::INTEGER AS n_events,
               CASE WHEN len(item_idx) >= {k} THEN len(item_idx) - 2 END::INTEGER AS valid_pos,
               CASE WHEN len(item_idx) >= {k} THEN len(item_idx) - 1 END::INTEGER AS test_pos
        FROM {seq} ORDER BY user_idx
    """
    params = {"protocol": "leave-one-out", "min_events": k, "order": "ts, src_row"}
    return publish_if_stale(wh, f"{dataset}.split_loo", sql, inputs=inputs, params=params)
