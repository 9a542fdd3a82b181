"""The state directory's pipeline lock as the CLI meets it: a second ``recsys pipeline`` on a busy home is
refused at once (exit 2, the lock's message) before any Prefect flow starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import recsys.flows.pipeline
from recsys.flows.cli import app
from recsys.flows.stage_cache import PipelineBusy, ensure_free, pipeline_lock


def test_a_second_pipeline_is_refused_before_its_flow_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))

    def no_flow(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pipeline flow started on a busy state directory")

    monkeypatch.setattr(recsys.flows.pipeline, "pipeline_flow", no_flow)
    with pipeline_lock(tmp_path):
        with pytest.raises(PipelineBusy, match="another pipeline"):
            ensure_free(tmp_path)
        result = CliRunner().invoke(app, ["pipeline"])
    assert result.exit_code == 2, result.output
    assert "another pipeline" in result.output and str(tmp_path) in result.output.replace("\n", "")
    ensure_free(tmp_path)  # released with the holder
