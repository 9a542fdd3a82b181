"""Checkpoints: safetensors weights + weights_only-loadable state, written whole, checked as a pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from recsys.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    state_path,
    weights_path,
)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return m


def test_round_trip_restores_weights_buffers_optimizer_and_state(tmp_path: Path) -> None:
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    save_checkpoint(
        tmp_path, "last", model, opt, {"epoch": 3, "history": [{"loss": 1.5}], "best": float("nan")}
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "last" and names[1].startswith("last@") and len(names) == 2
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["state.pt", "weights.safetensors"]

    other = _model(1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    state = load_checkpoint(tmp_path, "last", other, other_opt)
    assert state["epoch"] == 3 and state["history"] == [{"loss": 1.5}]
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    assert other_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_mismatched_pair_is_reported(tmp_path: Path) -> None:
    model = _model(0)
    save_checkpoint(tmp_path, "last", model, None, {"epoch": 1})
    save_weights(model, weights_path(tmp_path, "last"), metadata={"token": "other"})
    with pytest.raises(CheckpointError, match="different saves"):
        load_checkpoint(tmp_path, "last", _model(1))


def test_missing_files_and_wrong_model_are_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no state file"):
        load_checkpoint(tmp_path, "last", _model(0))
    save_weights(_model(0), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(nn.Linear(2, 2), tmp_path / "w.safetensors")
    assert not state_path(tmp_path, "w").exists()


@pytest.mark.parametrize("crash_at", ["weights", "rename", "link"])
def test_a_save_killed_at_any_step_leaves_the_previous_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    import recsys.training.checkpoint as ckpt

    first = _model(0)
    save_checkpoint(tmp_path, "last", first, None, {"epoch": 1})

    class Killed(BaseException):
        """Stands for SIGKILL: nothing after it runs, no except clause catches it."""

    def die(*args: object, **kwargs: object) -> None:
        raise Killed

    target = {"weights": "save_weights", "rename": "os.rename", "link": "_point"}[crash_at]
    if target == "os.rename":
        monkeypatch.setattr(ckpt.os, "rename", die)
    else:
        monkeypatch.setattr(ckpt, target, die)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, "last", _model(1), None, {"epoch": 2})
    monkeypatch.undo()

    restored = _model(2)
    assert load_checkpoint(tmp_path, "last", restored)["epoch"] == 1
    for (k, a), (_, b) in zip(first.state_dict().items(), restored.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    # The next save replaces it and leaves one unit behind.
    save_checkpoint(tmp_path, "last", _model(3), None, {"epoch": 3})
    assert load_checkpoint(tmp_path, "last", _model(4))["epoch"] == 3
    assert len(list(tmp_path.glob("last@*"))) == 1
