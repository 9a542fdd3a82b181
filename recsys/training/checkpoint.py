"""Checkpoints: weights as safetensors (no pickle), optimizer + loop state in a weights_only-loadable file.

A checkpoint ``<tag>`` in a directory is ONE unit: a directory ``<tag>@<token>/`` holding
``weights.safetensors`` (the model's state dict) and ``state.pt`` (optimizer state dict and the loop's
plain-Python state), and a symlink ``<tag>`` naming it. A save writes the new unit in an owned temporary
directory, renames it to ``<tag>@<token>``, then swaps the symlink with one atomic rename: a process killed
at any point leaves either the previous checkpoint or the new one, never half of each, so a re-run resumes.
Units the link no longer names are removed by the next save (or the owner-aware temp sweep).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.core.atomic import atomic_dir, atomic_path, temp_prefix

WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, inconsistent or does not fit the model."""


def weights_path(directory: str | Path, tag: str) -> Path:
    return Path(directory) / tag / WEIGHTS_FILE


def state_path(directory: str | Path, tag: str) -> Path:
    return Path(directory) / tag / STATE_FILE


def has_checkpoint(directory: str | Path, tag: str) -> bool:
    return weights_path(directory, tag).exists()


def save_weights(model: nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """The model's state dict (parameters and buffers) as safetensors, written temp-then-rename."""
    # Cloned to contiguous CPU tensors: safetensors refuses views and shared storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {})
    return path


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> dict[str, str]:
    """Load safetensors weights into ``model`` (on the model's device); returns the file's metadata."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no weights file at {path}")
    device = next((p.device for p in model.parameters()), None) or next(
        (b.device for b in model.buffers()), torch.device("cpu")
    )
    tensors = load_file(str(path), device=str(device))
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit the model: {exc}") from exc
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_checkpoint(
    directory: str | Path,
    tag: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``tag`` as one unit (see the module docstring); returns its weights file."""
    directory = Path(directory)
    token = uuid.uuid4().hex
    payload = {
        "token": token,
        "optimizer": optimizer.state_dict() if optimizer else None,
        "state": state or {},
    }
    unit = directory / f"{tag}@{token}"
    with atomic_dir(directory, tag) as staging:
        torch.save(payload, staging / STATE_FILE)
        save_weights(model, staging / WEIGHTS_FILE, metadata={"token": token, "tag": tag})
        os.rename(staging, unit)
    _point(directory, tag, unit)
    for old in directory.glob(f"{tag}@*"):
        if old != unit:
            shutil.rmtree(old, ignore_errors=True)
    return weights_path(directory, tag)


def _point(directory: Path, tag: str, unit: Path) -> None:
    """Make the symlink ``directory/tag`` name ``unit`` with one atomic rename."""
    link = directory / tag
    if link.is_dir() and not link.is_symlink():
        # A plain directory (weights written by hand with ``save_weights``) cannot be renamed over.
        shutil.rmtree(link)
    tmp = directory / f"{temp_prefix(link)}{uuid.uuid4().hex[:8]}.tmp"
    os.symlink(unit.name, tmp)
    try:
        os.replace(tmp, link)
    finally:
        if tmp.is_symlink():
            tmp.unlink()


def load_checkpoint(
    directory: str | Path,
    tag: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load weights (and optimizer state) of checkpoint ``tag``; returns the loop state saved with it."""
    spath = state_path(directory, tag)
    if not spath.exists():
        raise CheckpointError(f"checkpoint {tag!r} in {directory} has no state file {spath.name}")
    payload = torch.load(spath, map_location="cpu", weights_only=True)
    metadata = load_weights(model, weights_path(directory, tag))
    if metadata.get("token") != payload.get("token"):
        raise CheckpointError(
            f"checkpoint {tag!r} in {directory}: weights and state files come from different saves; "
            "the checkpoint was not written by save_checkpoint"
        )
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return dict(payload.get("state") or {})
