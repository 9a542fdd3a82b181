"""Checkpoints: weights as safetensors (no pickle), optimizer + loop state in a weights_only-loadable file.

A checkpoint ``<tag>`` in a directory is two files, each written to a temporary path and renamed:
``<tag>.safetensors`` (the model's state dict) and ``<tag>.state.pt`` (optimizer state dict and the loop's
plain-Python state). Both carry the same random ``token``; a pair whose tokens differ (a crash between the
two renames) is reported instead of being resumed from silently.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.core.atomic import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint is missing, inconsistent or does not fit the model."""


def weights_path(directory: str | Path, tag: str) -> Path:
    return Path(directory) / f"{tag}.safetensors"


def state_path(directory: str | Path, tag: str) -> Path:
    return Path(directory) / f"{tag}.state.pt"


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
    """Write ``<tag>.state.pt`` (optimizer + loop state), then ``<tag>.safetensors``; returns the latter."""
    directory = Path(directory)
    token = uuid.uuid4().hex
    payload = {
        "token": token,
        "optimizer": optimizer.state_dict() if optimizer else None,
        "state": state or {},
    }
    with atomic_path(state_path(directory, tag)) as tmp:
        torch.save(payload, tmp)
    return save_weights(model, weights_path(directory, tag), metadata={"token": token, "tag": tag})


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
            "delete the directory to start over"
        )
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return dict(payload.get("state") or {})
