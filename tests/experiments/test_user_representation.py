"""User representations on synthetic data: the generator's category preference is its true logit up to the
price band, the probe labels are the generator's hidden truth, the loss table around the transition, and a
tiny run end to end (report, chart, step cost) whose embeddings are registered for serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys.core.config import PathsConfig
from recsys.experiments.user_representation import (
    SYNTHETIC_TASKS,
    EncoderSettings,
    MaskRun,
    SyntheticSource,
    UserRepresentationConfig,
    prepare,
    register_embeddings,
    run_user_representation,
    synthetic_data,
    transition_frame,
    transition_table,
)
from recsys.synthetic import ClickModel, SyntheticConfig, read_manifest
from recsys.synthetic.config import ClickModelConfig
from recsys.training.loop import LoopConfig
from recsys.training.user_representation import ContrastiveConfig

SOURCE = SyntheticSource(preset="tiny", n_users=60, requests_per_user=6.0)


def test_category_preference_is_the_true_logit_up_to_the_price_band() -> None:
    click = ClickModelConfig(hour=0.0, quality=0.0, interaction_drift=1.0, drift=0.7, loyalty=0.0)
    config = SyntheticConfig.tiny().model_copy(update={"click": click})
    model = ClickModel(config)
    state = model.initial_state(np.arange(5))  # no clicks yet: no short-term or creator term
    ts = config.sessions.start_ts + np.array([0, 3, 20, 50, 80]) * 86_400
    items = np.tile(np.arange(model.catalogue.n_items), (5, 1))
    logit = model.logit(state, items, ts)
    pref = model.category_preference(state.profile, state.taste, ts)
    residual = logit - pref[np.arange(5)[:, None], model.catalogue.category[items]]
    # What is left is the bias plus the profile x price-band cross: the same for every item of a band.
    band = model.catalogue.price_band[items]
    w = model.w_region_device_band[state.profile[:, 2], state.profile[:, 3]]  # [5, bands]
    expected = click.bias + click.interaction * w[np.arange(5)[:, None], band]
    assert residual == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="ts"):
        model.category_preference(state.profile, state.taste, ts[:2])


def test_synthetic_labels_are_the_generators_hidden_truth(tmp_path: Path) -> None:
    config = UserRepresentationConfig(dataset="syn", synthetic=SOURCE)
    data = prepare(tmp_path / "warehouse.duckdb", config, tmp_path)
    assert list(data.labels) == list(SYNTHETIC_TASKS)
    n = len(data.histories.user_ids)
    assert n > 30 and all(len(v) == n for v in data.labels.values())
    manifest = read_manifest(synthetic_data(tmp_path, SOURCE))
    assert manifest.config.policy.impression_log_rate == 0.0 and manifest.config.users.n_users == 60
    truth = ClickModel(manifest.config).initial_state(np.asarray(data.histories.user_ids))
    vocab = manifest.config.users
    assert data.labels["gender"] == [vocab.genders[g] for g in truth.profile[:, 1]]
    assert data.labels["device"] == [vocab.devices[d] for d in truth.profile[:, 3]]
    assert data.labels["top taste category"] == [f"cat_{c:02d}" for c in truth.taste.argmax(1)]
    assert set(data.labels["true future top category"]) <= {f"cat_{c:02d}" for c in range(8)}


def test_the_synthetic_source_is_checked() -> None:
    with pytest.raises(ValueError, match="synthetic.preset 'nope'"):
        SyntheticSource(preset="nope")
    with pytest.raises(ValueError, match="exclusive"):
        UserRepresentationConfig(source_dir=Path("ml-100k"), synthetic=SOURCE)


def _run(mask: str, seed: int, losses: list[float]) -> MaskRun:
    return MaskRun(mask, seed, {"t": 0.5}, {}, losses, [0.1] * len(losses), 4, len(losses), 1.0, 10, 1)


def test_the_transition_table_bins_the_mean_loss_over_seeds() -> None:
    runs = {
        "causal": [_run("causal", 0, [4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.0]), _run("causal", 1, [2.0] * 8)],
        "ggsm": [_run("ggsm", 0, [5.0] * 8)],
    }
    frame = transition_frame(runs, window=4)
    causal = frame.filter(pl.col("mask") == "causal").sort("offset")
    assert causal["offset"].to_list() == [-4, -3, -2, -1, 0, 1, 2, 3]
    assert causal["loss"].to_list() == [3.0, 3.0, 2.5, 2.5, 2.0, 2.0, 1.5, 1.5]
    table = transition_table(frame, bin_steps=2)
    assert table[0] == "| Steps from the transition | causal | ggsm |"
    assert table[2:] == [
        "| -4 to -3 | 3.0000 | 5.0000 |",
        "| -2 to -1 | 2.5000 | 5.0000 |",
        "| +0 to +1 | 2.0000 | 5.0000 |",
        "| +2 to +3 | 1.5000 | 5.0000 |",
    ]


def test_a_tiny_synthetic_run_writes_report_chart_and_servable_embeddings(tmp_path: Path) -> None:
    from recsys.serving.user_embeddings import load_user_embeddings

    config = UserRepresentationConfig(
        dataset="syn",
        synthetic=SOURCE,
        masks=("causal", "ggsm"),
        seeds=(0,),
        encoder=EncoderSettings(max_len=16, dim=16, num_heads=2, num_layers=1),
        contrastive=ContrastiveConfig(batch_size=16, future_len=4),
        loop=LoopConfig(max_epochs=2, patience=2, monitor="pair_recall@10", progress=False),
    )
    paths = PathsConfig(home=tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs, report = run_user_representation(config, paths, step_cost_steps=3)
    finally:
        torch.set_num_threads(before)
    text = report.read_text()
    assert "true future top category" in text and "Cost per training step" in text
    assert "| soft mask + gradient norms (GG-SM) |" in text
    assert set(runs) == {"causal", "ggsm"} and runs["ggsm"][0].total_steps == 2 * 4
    chart = report.with_suffix(".html").read_text()
    assert "vega" in chart and "offset" in chart
    values = pl.read_csv(tmp_path / "reports" / "user_repr_syn_transition.csv")
    assert set(values["mask"].to_list()) == {"causal", "ggsm"}
    tag = register_embeddings(config, "ggsm", 0, "syn-users", paths)
    table = load_user_embeddings(tag)
    exported = next((tmp_path / "artifacts" / "user_repr" / "syn").glob("*/ggsm-seed0/embeddings.parquet"))
    frame = pl.read_parquet(exported)
    first = frame.row(0, named=True)
    assert table.lookup(int(first["user_id"])) == pytest.approx(first["embedding"], abs=1e-6)
    assert table.card.users == frame.height and table.card.data_version == runs["ggsm"][0].data_version
