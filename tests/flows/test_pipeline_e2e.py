"""The main job as a user runs it: `recsys pipeline` in a subprocess, interrupted with kill -9, re-run.

Real runs on the tiny synthetic preset, every invocation against one local Prefect API of the module's own
(``crash_recovery.prefect_server``; an ephemeral API per invocation would cost 10-35 s each): an
uninterrupted reference; on a second home the same command killed with SIGKILL (its whole process group)
three times, in three stages: in the features stage, in the retrieval stage after its first epoch
checkpoint, and in the distill stage; each time the same command again, the last one to the end; then a
third invocation on the reference home with nothing changed, which must skip every stage. The interrupted
home must end with the same tables (content versions), metrics and registered model tags
(content-addressed) as the reference, with no temp file or staging directory left (in the state directory
or the system temp dir), no half-written table and no run left 'running'.
``python -m recsys.benchmarks.crash_recovery --points 10`` is the same at ten seeded random points.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from recsys.benchmarks.crash_recovery import (
    TINY_CONFIG,
    KillPoint,
    PipelineProcess,
    compare,
    kill_at,
    prefect_server,
    run_to_end,
    stage_records,
)
from recsys.flows.stage_cache import history

pytestmark = pytest.mark.timeout(1500)

CONFIG = TINY_CONFIG


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201  (a generator fixture)
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    with prefect_server(root / "prefect-server") as api:
        reference, interrupted = root / "reference", root / "interrupted"
        ref_tmp, tmp = root / "reference-tmp", root / "interrupted-tmp"
        run_to_end(reference, ref_tmp, config, root / "reference.log", api, timeout=900)

        log = root / "interrupted.log"
        # 1. In the features stage (the tiny build takes a few seconds: 0.5 s in, it is mid-way).
        kill, _ = kill_at(interrupted, tmp, config, log, api, KillPoint("features", 0.5))
        assert kill.killed and kill.landed == "features", kill
        # 2. In the retrieval stage, once SASRec's first epoch checkpoint is on disk.
        run = PipelineProcess.start(interrupted, tmp, config, log, api)
        checkpoints = interrupted / "artifacts" / "retrieval" / "synthetic" / "sasrec"
        deadline = time.monotonic() + 900
        try:
            while not list(checkpoints.glob("*/last/state.pt")):
                assert run.process.poll() is None, f"pipeline ended before it could be interrupted:\n{log}"
                assert time.monotonic() < deadline, "the retrieval stage never wrote its first checkpoint"
                time.sleep(0.1)
        finally:
            run.kill()
        assert "retrieval" not in stage_records(interrupted), "the kill landed after the retrieval stage"
        # 3. In the distill stage (about 20 s on the tiny preset: 4 s in, its teacher is training).
        kill, _ = kill_at(interrupted, tmp, config, log, api, KillPoint("distill", 4.0))
        assert kill.killed and kill.landed == "distill", kill
        assert "distill" not in stage_records(interrupted), "the kill landed after the distill stage"

        run_to_end(interrupted, tmp, config, log, api, timeout=900)
        yield {
            "root": root,
            "config": config,
            "reference": reference,
            "interrupted": interrupted,
            "reference_tmp": ref_tmp,
            "interrupted_tmp": tmp,
            "api": api,
        }


def _stages(home: Path) -> dict[str, dict]:
    return stage_records(home)


def _run(homes: dict, home: Path, config: Path, log: Path) -> None:
    run_to_end(home, homes["root"] / "rerun-tmp", config, log, homes["api"], timeout=900)


def test_interrupted_run_ends_with_the_reference_results(homes: dict) -> None:
    ref, got = _stages(homes["reference"]), _stages(homes["interrupted"])
    assert set(ref) == set(got) == {"retrieval", "ranking", "distill", "package", "ab"}
    for name in ("popularity", "sasrec"):
        for metric, value in ref["retrieval"]["models"][name]["test"].items():
            assert got["retrieval"]["models"][name]["test"][metric] == pytest.approx(value, abs=1e-6), metric
    assert got["ranking"]["models"]["deepfm"]["test"]["auc"] == pytest.approx(
        ref["ranking"]["models"]["deepfm"]["test"]["auc"], abs=1e-6
    )
    assert got["distill"]["auc"] == pytest.approx(ref["distill"]["auc"], abs=1e-6)
    # The in-process arms draw their request ids (which seed the served slates) from the simulation's seed,
    # so the A/B readout is reproduced to the last digit.
    assert got["ab"]["arms"] == ref["ab"]["arms"]
    assert got["ab"]["table"] == ref["ab"]["table"]
    # Registered models are content-addressed: equal tags mean byte-identical weights and catalogue.
    assert got["package"]["retriever"] == ref["package"]["retriever"]
    assert got["package"]["control"] == ref["package"]["control"]
    # The bento's ranker is the distilled student, registered under the stable name and reproduced exactly.
    assert ref["package"]["ranker"].startswith("synthetic-ranker:")
    assert ref["package"]["ranker_architecture"] == ref["distill"]["student"]["architecture"]
    assert got["package"]["ranker"] == ref["package"]["ranker"]
    report = (homes["reference"] / "reports" / "pipeline_synthetic.md").read_text()
    assert f"ranker `{ref['package']['ranker']}`" in report
    checks = _checks(homes)
    # Every test figure of every model, the distillation figures, the A/B readout, the tags; and the latest
    # content version of every table.
    assert checks["metrics and model tags"] == []
    assert checks["table versions"] == []


def _checks(homes: dict) -> dict[str, list[str]]:
    return compare(homes["reference"], homes["reference_tmp"], homes["interrupted"], homes["interrupted_tmp"])


def test_interrupted_run_leaves_nothing_half_written(homes: dict) -> None:
    checks = _checks(homes)
    assert checks["rows and runs"] == []  # every table holds its lineage row's rows; no run left 'running'
    # No hidden temp or staging directory, every checkpoint unit named by its link, no DuckDB WAL; the same
    # files as the reference's; nothing in the system temp dir that an uninterrupted run does not leave.
    assert checks["leftovers in RECSYS_HOME"] == []
    assert checks["files beside the reference's"] == []
    assert checks["leftovers in the temp dir"] == []


def test_second_run_with_nothing_changed_skips_every_stage(homes: dict) -> None:
    home = homes["reference"]
    before = len(history(home / "warehouse.duckdb"))
    log = homes["root"] / "rerun.log"
    _run(homes, home, homes["config"], log)
    text = log.read_text()
    for stage in ("retrieval", "ranking", "distill", "package", "ab"):
        assert f"stage {stage}: unchanged inputs" in text, stage
    assert len(history(home / "warehouse.duckdb")) == before  # no stage re-ran, so none re-recorded


def test_changed_config_reruns_only_the_stages_that_depend_on_it(homes: dict) -> None:
    home = homes["reference"]
    changed = dict(CONFIG, ranking={**CONFIG["ranking"], "short_len": 10})
    config = homes["root"] / "changed.yaml"
    config.write_text(yaml.safe_dump(changed))
    log = homes["root"] / "changed.log"
    _run(homes, home, config, log)
    text = log.read_text()
    for stage in ("retrieval", "distill", "package", "ab"):
        assert f"stage {stage}: unchanged inputs" in text, stage
    assert "stage ranking: unchanged inputs" not in text
