"""The retrieval experiment splits in memory (evaluation.retrieval.leave_one_out); the warehouse records the
same split as ``<ds>.split_loo`` (features.splits). Both must name the same targets, or the recorded split
would not be the one the numbers came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.evaluation.retrieval import leave_one_out
from recsys.features.config import FeatureConfig
from recsys.features.sequences import build_sequences, load_sequences, num_items
from recsys.features.splits import build_split_loo
from recsys.ingest.movielens import ingest_movielens
from recsys.warehouse import Warehouse


def test_in_memory_split_matches_the_recorded_split(ml100k_dir: Path, warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        ingest_movielens(wh, ml100k_dir)
        build_sequences(wh, "ml100k")
        build_split_loo(wh, "ml100k", FeatureConfig())
        sequences = load_sequences(wh, "ml100k")
        recorded = wh.sql(
            "SELECT s.user_idx, s.item_idx[l.valid_pos + 1] AS valid_item,"
            " s.item_idx[l.test_pos + 1] AS test_item"
            " FROM ml100k.sequences s JOIN ml100k.split_loo l USING (user_idx)"
            " WHERE l.test_pos IS NOT NULL ORDER BY s.user_idx"
        )
        split = leave_one_out(sequences, num_items(wh, "ml100k"))
    order = np.argsort(split.test.users)
    assert split.test.users[order].tolist() == recorded["user_idx"].to_list()
    assert split.test.targets[order].tolist() == recorded["test_item"].to_list()
    valid_order = np.argsort(split.valid.users)
    assert split.valid.targets[valid_order].tolist() == recorded["valid_item"].to_list()
    assert len(split.test) == 943
