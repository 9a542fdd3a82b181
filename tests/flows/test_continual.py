"""The continual flows for real (Prefect's local server): the whole stream for one method, then the nightly
flow finds nothing new; the nightly deployment's schedule and parameters."""

from __future__ import annotations

from recsys.core.config import PathsConfig
from recsys.experiments.continual import ContinualConfig, read_results
from recsys.flows.continual import NIGHTLY_CRON, continual_flow, nightly_deployment, nightly_incremental_flow
from recsys.synthetic.config import CatalogueConfig, SessionConfig, SyntheticConfig, UserConfig
from recsys.training.continual import ContinualTrainConfig
from tests.fixtures import one_thread  # noqa: F401  (autouse fixture: one torch thread)

TINY = SyntheticConfig(
    seed=7,
    catalogue=CatalogueConfig(n_items=120, n_categories=4, n_creators=15),
    users=UserConfig(n_users=20),
    sessions=SessionConfig(requests_per_user_mean=15, horizon_days=30, slate_size=5, pool_size=10),
)


def test_flows_run_the_stream_and_the_nightly_step() -> None:
    config = ContinualConfig(
        dataset="syn_flow",
        synthetic=TINY,
        methods=("finetune",),
        train=ContinualTrainConfig(
            n_periods=3, served_len=4, privileged_len=16, batch_size=64, epochs_first=1
        ),
    )
    out = continual_flow(config)
    assert out["experiment_id"] == config.experiment_id and set(out["methods"]) == {"finetune"}
    assert 0.0 < out["methods"]["finetune"]["average_final_auc"] < 1.0
    rows = read_results(PathsConfig().warehouse, config.experiment_id)
    assert rows.height == 6  # cells (1,1), (2,1), (2,2), (3,1), (3,2), (3,3)

    nightly = nightly_incremental_flow("syn_flow", "finetune")  # all periods learned, no newer examples
    assert nightly["step"] is None and "up to date" in nightly["message"]
    assert read_results(PathsConfig().warehouse, config.experiment_id).height == 6


def test_nightly_deployment_is_scheduled_with_its_parameters() -> None:
    deployment = nightly_deployment("ml100k", "replay")
    assert deployment.name == "continual-nightly-ml100k-replay"
    assert deployment.parameters == {"dataset": "ml100k", "method": "replay"}
    assert [s.schedule.cron for s in deployment.schedules] == [NIGHTLY_CRON]
