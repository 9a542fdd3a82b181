"""The TCA4Rec experiment end to end on a slice of MovieLens-100K (real titles, 30 users), and its CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys.core.config import PathsConfig
from recsys.experiments.tca4rec import (
    LMSize,
    TCA4RecExperimentConfig,
    app,
    load_titles,
    run_tca4rec_experiment,
)
from recsys.ingest.movielens import ML100K_FILES
from recsys.training.loop import LoopConfig
from recsys.training.tca4rec import TCATrainConfig


@pytest.fixture
def ml_slice(ml100k_dir: Path, tmp_path: Path) -> Path:
    """The real item/user files with the ratings of users 1..30 only."""
    dst = tmp_path / "ml-slice"
    dst.mkdir()
    for name in ML100K_FILES:
        if name != "u.data":
            shutil.copy(ml100k_dir / name, dst / name)
    lines = (ml100k_dir / "u.data").read_text().splitlines()
    (dst / "u.data").write_text("\n".join(x for x in lines if int(x.split("\t")[0]) <= 30) + "\n")
    return dst


def _config(source: Path, **update: object) -> TCA4RecExperimentConfig:
    return TCA4RecExperimentConfig(
        source_dir=source,
        seeds=(0, 1),
        lm=LMSize(dim=16, num_layers=1, num_heads=2, mlp_dim=32),
        train=TCATrainConfig(epochs=1, examples_per_epoch=48, batch_size=16, beam_width=10, alpha=0.5),
        sasrec_loop=LoopConfig(max_epochs=1, patience=1, device="cpu", progress=False),
        eval_users=12,
        **update,
    )


def test_experiment_compares_three_models_and_writes_the_report(ml_slice: Path, tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    result = run_tca4rec_experiment(_config(ml_slice), paths)
    assert [r.seed for r in result.runs] == [0, 1]
    for run in result.runs:
        assert set(run.evaluations) == {"next-token", "tca", "sasrec"}
        for evaluation in run.evaluations.values():
            assert len(evaluation.users) == 12 and 0.0 <= evaluation.metrics["ndcg@10"] <= 1.0
            assert evaluation.metrics["hr@10"] >= evaluation.metrics["ndcg@10"]
    assert {(t.a, t.b) for t in result.tests} == {("tca", "next-token"), ("tca", "sasrec")}
    assert any("over seeds" in t.test for t in result.tests) and any(
        "Wilcoxon" in t.test for t in result.tests
    )
    report = result.report_path.read_text()
    assert "seeds 0, 1 finished of 2 planned" in report
    assert "| tca |" in report and "| next-token |" in report and "| sasrec |" in report
    titles = load_titles(paths.warehouse, "ml100k")
    assert len(titles) == result.num_items and titles[0] == "Toy Story (1995)"


def test_config_and_cli_reject_bad_values(ml_slice: Path) -> None:
    with pytest.raises(ValueError, match="alpha"):
        TCA4RecExperimentConfig(source_dir=ml_slice, train=TCATrainConfig(alpha=0.0))
    with pytest.raises(ValueError, match="beam_width"):
        TCA4RecExperimentConfig(train=TCATrainConfig(beam_width=5))
    with pytest.raises(ValueError, match="seeds"):
        TCA4RecExperimentConfig(seeds=(1, 1))
    result = CliRunner().invoke(app, ["run", "--source-dir", str(ml_slice), "--alpha", "0"])
    assert result.exit_code != 0 and "alpha" in result.output


def test_experiment_fine_tunes_a_local_hf_model_with_lora(ml_slice: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from recsys.models.title_lm import LoRASettings, TitleTokenizerConfig, train_title_tokenizer

    tok = train_title_tokenizer(
        ["Star Wars (1977)", "Toy Story (1995)"] * 3, TitleTokenizerConfig(vocab_size=300)
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    lm_dir = tmp_path / "tiny-lm"
    config = transformers.GPT2Config(vocab_size=len(fast), n_positions=512, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(lm_dir)
    fast.save_pretrained(lm_dir)
    base = _config(ml_slice)
    result = run_tca4rec_experiment(
        base.model_copy(
            update={"seeds": (0,), "eval_users": 4, "lm_path": lm_dir, "lora": LoRASettings(rank=2)}
        ),
        PathsConfig(home=tmp_path / "home"),
    )
    run = result.runs[0]
    assert run.num_parameters["tca"] == run.num_parameters["next-token"] > 0
    assert set(run.evaluations) == {"next-token", "tca", "sasrec"}
    assert "tiny-lm (local directory), LoRA rank 2" in result.report_path.read_text()
    with pytest.raises(ValueError, match="lora"):
        TCA4RecExperimentConfig(lora=LoRASettings())
