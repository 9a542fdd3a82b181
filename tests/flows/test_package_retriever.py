"""The pipeline packages and serves the retrieval model it trained under the data's rule.

A tiny events file is trained through ``experiments.retrieval`` with the config the pipeline's retrieval stage
builds (no objectives given: the data's rule, i.e. full softmax on raw dot products, d 64, a history from the
rule). The stage's record of the run (``serving_record``) is what the package stage hands to
``register_learned_retriever``; the registered model must be the trained one (config, weights, temperature)
and its served scores (``serving.service.ModelRuntime.score_all``) the offline evaluation's scores of the same
histories. A learned temperature is served as trained, a record that is not the architecture's config is
refused, and the A/B simulator's arms are the pipeline's own checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.core.config import PathsConfig
from recsys.evaluation.retrieval import leave_one_out
from recsys.experiments.retrieval import (
    OBJECTIVE_PRESETS,
    ExperimentResult,
    RetrievalExperimentConfig,
    run_retrieval_experiment,
    serving_record,
)
from recsys.features.config import FeatureConfig
from recsys.features.sequences import load_sequences, num_items
from recsys.flows.package import register_learned_retriever
from recsys.models.losses import FullSoftmaxConfig
from recsys.models.registry import build_model, model_config
from recsys.serving.registry import load_model
from recsys.serving.service import MappedHistory, ModelRuntime
from recsys.simulation.arms import register_pipeline_models
from recsys.training.loop import LoopConfig
from recsys.training.presets import QUICK_RETRIEVAL_LOOP
from recsys.training.retrieval import RetrievalTask, RetrievalTrainConfig, served_temperature
from recsys.warehouse import Warehouse

DATASET = "syn_rule_pkg"  # its own store names: the BentoML store is shared by the test session


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentResult, PathsConfig]:
    root = tmp_path_factory.mktemp("rule-package")
    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp"]
    for user in range(1, 41):
        start, n = int(rng.integers(0, 12)), int(rng.integers(4, 10))
        lines += [f"{user},{100 + (start + i) % 12},{1_600_000_000 + 3600 * i}" for i in range(n)]
    events = root / "events.csv"
    events.write_text("\n".join(lines) + "\n")
    paths = PathsConfig(home=root / "home")
    # What the pipeline's retrieval stage builds: no objectives (the default), an explicit history length.
    config = RetrievalExperimentConfig(
        dataset=DATASET,
        events_path=events,
        models=("sasrec",),
        seeds=(0,),
        train=RetrievalTrainConfig().model_copy(update={"max_len": 8}),
        loop=LoopConfig(max_epochs=2, patience=2, progress=False),
        comparisons=(),
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_retrieval_experiment(config, paths), paths
    finally:
        torch.set_num_threads(before)


def test_the_experiment_defaults_to_the_data_rule() -> None:
    assert RetrievalExperimentConfig().objectives == (OBJECTIVE_PRESETS["auto"],)


def test_the_packaged_retriever_is_the_trained_rule_model_and_serves_its_offline_scores(
    trained: tuple[ExperimentResult, PathsConfig],
) -> None:
    result, paths = trained
    run, settings = result.runs["sasrec"][0], result.settings["sasrec"]
    assert run.model is not None and run.fit is not None and run.fit.checkpoint_dir is not None
    # The rule on this data: full softmax on raw dot products at temperature 1, d 64 (not the registry's
    # d-50 L2 default that packaging used to rebuild).
    assert settings.train.loss == FullSoftmaxConfig()
    assert run.model.config.embedding_dim == 64 and run.model.config.normalize is False

    record = serving_record(run, settings)
    assert record == {"model_config": run.model.config.model_dump(mode="json"), "temperature": 1.0}
    tag = register_learned_retriever(
        paths.warehouse,
        DATASET,
        "sasrec",
        run.fit.checkpoint_dir,
        model_config_json=record["model_config"],
        temperature=record["temperature"],
    )
    loaded = load_model(tag)
    assert loaded.card.model_config_json == run.model.config.model_dump(mode="json")
    assert loaded.card.temperature == 1.0
    trained_state = run.model.state_dict()
    for name, tensor in loaded.module.state_dict().items():
        assert torch.equal(tensor, trained_state[name]), name

    with Warehouse(paths.warehouse, read_only=True) as wh:
        split = leave_one_out(load_sequences(wh, DATASET), num_items(wh, DATASET))
    cases = split.test
    batch = cases.batch(np.arange(len(cases)), settings.train.max_len)
    task = RetrievalTask(run.model, split, settings.train)
    with torch.no_grad():
        offline = task.score_fn(run.model)(batch)  # [B, N + 1], what the evaluation ranks
    histories = [
        MappedHistory(items[:n].numpy(), ts[:n].numpy(), [])
        for items, ts, n in zip(batch.items, batch.ts, batch.lengths.tolist(), strict=True)
    ]
    request_ts = batch.query_ts[torch.arange(len(cases)), batch.lengths - 1].numpy()
    runtime = ModelRuntime(loaded, torch.device("cpu"), micro_batch=64)
    served = runtime.score_all(histories, request_ts)
    torch.testing.assert_close(served[:, 1:], offline[:, 1:], rtol=1e-5, atol=1e-5)


def test_a_learned_temperature_is_served_as_trained(trained: tuple[ExperimentResult, PathsConfig]) -> None:
    result, _ = trained
    run = result.runs["sasrec"][0]
    objective = FullSoftmaxConfig(normalize=True, temperature=0.05, learn_temperature=True)
    model = run.model
    assert model is not None
    # A model with a learned temperature: its value, not the objective's starting constant, is served.
    learned = build_model(
        "sasrec", model_config("sasrec", num_items=result.num_items, max_len=8, learned_temperature=0.05)
    )
    with torch.no_grad():
        learned.input.log_temperature.fill_(float(np.log(0.2)))
    assert served_temperature(objective, learned) == pytest.approx(0.2)
    assert served_temperature(FullSoftmaxConfig(), model) == 1.0


def test_a_record_that_is_not_the_architectures_config_is_refused(
    trained: tuple[ExperimentResult, PathsConfig],
) -> None:
    result, paths = trained
    run = result.runs["sasrec"][0]
    assert run.fit is not None and run.fit.checkpoint_dir is not None
    with pytest.raises(ValueError, match="model_config_json"):
        register_learned_retriever(
            paths.warehouse,
            DATASET,
            "sasrec",
            run.fit.checkpoint_dir,
            model_config_json={"num_items": result.num_items, "embedding_dim": -3},
            temperature=1.0,
        )
    with pytest.raises(ValueError, match="temperature"):
        register_learned_retriever(
            paths.warehouse,
            DATASET,
            "sasrec",
            run.fit.checkpoint_dir,
            model_config_json=serving_record(run, result.settings["sasrec"])["model_config"],
            temperature=0.0,
        )


def test_the_ab_arms_reuse_the_pipelines_rule_checkpoint(
    trained: tuple[ExperimentResult, PathsConfig],
) -> None:
    """``recsys ab run`` without tags registers the pipeline's models: the ones its retrieval stage trained
    (same checkpoint, so the same weights), served at their training temperature."""
    result, paths = trained
    # The pipeline's retrieval stage in the quick profile, one epoch: the same data as the fixture's run.
    stage = RetrievalExperimentConfig(
        dataset=DATASET,
        models=("sasrec",),
        seeds=(0,),
        train=RetrievalTrainConfig().model_copy(update={"max_len": FeatureConfig().max_seq_len}),
        loop=QUICK_RETRIEVAL_LOOP.model_copy(update={"max_epochs": 1}),
        comparisons=(),
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = run_retrieval_experiment(stage, paths).runs["sasrec"][0]
        tags = register_pipeline_models(DATASET, ("popularity", "sasrec"), max_epochs=1, home=paths.home)
    finally:
        torch.set_num_threads(before)
    assert run.model is not None
    served = load_model(tags["sasrec"])
    assert served.card.model_config_json == run.model.config.model_dump(mode="json")
    assert served.card.temperature == 1.0 and served.module.config.normalize is False
    trained_state = run.model.state_dict()
    for name, tensor in served.module.state_dict().items():
        assert torch.equal(tensor, trained_state[name]), name
    assert load_model(tags["popularity"]).card.architecture == "popularity"
    # No third checkpoint: the arms trained nothing of their own (the fixture's run and the stage's only).
    checkpoints = paths.artifacts / "retrieval" / DATASET / "sasrec"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        {Path(r.fit.checkpoint_dir).name for r in (result.runs["sasrec"][0], run) if r.fit is not None}
    )
