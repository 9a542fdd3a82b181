"""Set-up shared by the test folders that train models on tiny synthetic data (tests/experiments and
tests/training): the one-thread fixture, tiny generator configs, a tiny warehouse with its examples built,
and the small training configs those tests agree on. Import the fixture into a conftest to apply it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import build_examples
from recsys.synthetic.config import CatalogueConfig, SessionConfig, SyntheticConfig, UserConfig
from recsys.synthetic.generator import generate
from recsys.synthetic.warehouse_load import load_into_warehouse
from recsys.training.continual import ContinualTrainConfig
from recsys.training.loop import LoopConfig
from recsys.warehouse import Warehouse


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: intra-op threads only add contention (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_synthetic(
    *,
    seed: int,
    n_items: int,
    n_users: int,
    requests_per_user: float,
    horizon_days: float,
    n_creators: int = 20,
) -> SyntheticConfig:
    """A generator run small enough to train on in seconds: 4 categories, slates of 5 from pools of 10."""
    return SyntheticConfig(
        seed=seed,
        catalogue=CatalogueConfig(n_items=n_items, n_categories=4, n_creators=n_creators),
        users=UserConfig(n_users=n_users),
        sessions=SessionConfig(
            requests_per_user_mean=requests_per_user, horizon_days=horizon_days, slate_size=5, pool_size=10
        ),
    )


#: The run the ranking and teacher -> student experiment tests go end to end on.
EXPERIMENT_SYNTHETIC = tiny_synthetic(seed=4, n_items=150, n_users=30, requests_per_user=20, horizon_days=15)


def build_synthetic_warehouse(config: SyntheticConfig, root: Path, dataset: str = "syn") -> Path:
    """Generate ``config`` under ``root``, load it as ``dataset`` into ``root/warehouse.duckdb`` and build its
    examples; returns the warehouse path."""
    manifest = generate(config, root / "run")
    path = root / "warehouse.duckdb"
    with Warehouse(path) as wh:
        load_into_warehouse(wh, manifest, dataset)
        build_examples(wh, dataset, FeatureConfig())
    return path


def one_epoch_loop() -> LoopConfig:
    """One epoch on AUC, no progress bar: the experiments' tests check the plumbing, not convergence."""
    return LoopConfig(monitor="auc", max_epochs=1, patience=1, progress=False)


def tiny_continual_train(replay_buffer: int) -> ContinualTrainConfig:
    """Three periods of one epoch each, a served window of 4 and a privileged one of 16."""
    return ContinualTrainConfig(
        n_periods=3,
        served_len=4,
        privileged_len=16,
        batch_size=64,
        epochs_first=1,
        epochs=1,
        replay_buffer=replay_buffer,
    )
