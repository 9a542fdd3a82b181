"""Hierarchical asynchronous updates (HyFormer's systems recipe): sparse rows at once, dense one step late.

A ranking model's parameters fall in two groups. The **sparse** ones are the embedding tables
(``nn.Embedding`` / ``nn.EmbeddingBag`` weights): a step touches a few of their rows, and a row's next
lookup should see its update. The **dense** ones are everything else (attention, MLPs, norms): every step
touches all of them, and under data parallelism their gradient all-reduce is the big collective. The rule,
with g_k the gradient of step k's loss (computed at the weights the step's forward pass saw):

    sparse:  S_k = S_{k-1} + update(gs_k)          (this step's gradient)
    dense:   W_k = W_{k-1} + update(gw_{k-1})      (the previous step's gradient; W_1 = W_0)

so the dense all-reduce of step k is launched after its backward pass and only waited for after step k + 1's
backward pass: it runs while step k + 1 computes. ``update`` is the optimiser's own step (SGD: -lr * g;
AdamW: its moments advance once per applied gradient), one optimiser per group. The last step's dense
gradient is still pending when training ends (``flush`` applies it).

Under ``torch.distributed`` (``distributed=True``) the updater averages the gradients over the processes
itself (the model is not wrapped in DistributedDataParallel): the sparse group's all-reduce is blocking,
the dense group's is asynchronous, in one flat buffer. Gradient clipping is not part of the rule (the two
groups' gradients belong to different steps) and is refused by the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SPARSE_MODULES = (nn.Embedding, nn.EmbeddingBag)
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(sparse, dense) trainable parameters: the weights of embedding modules, and all the others."""
    sparse_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, SPARSE_MODULES):
            sparse_ids.add(id(module.weight))
    sparse, dense, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (sparse if id(p) in sparse_ids else dense).append(p)
    return sparse, dense


class HierarchicalUpdater:
    """``zero_grad`` / ``step`` like an optimiser, applying the rule of the module docstring."""

    def __init__(
        self, model: nn.Module, make_optimizer: OptimizerFactory, *, distributed: bool = False
    ) -> None:
        self.sparse, self.dense = split_parameters(model)
        if not self.dense:
            raise ValueError("the model has no dense parameters: hierarchical updates need both groups")
        self.sparse_opt = make_optimizer(self.sparse) if self.sparse else None
        self.dense_opt = make_optimizer(self.dense)
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if self.distributed else 1
        self._pending: torch.Tensor | None = None  # flat dense gradient of the previous step
        self._handle: Any = None  # its all-reduce, in flight

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*(self.sparse_opt.param_groups if self.sparse_opt else []), *self.dense_opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.sparse_opt is not None:
            self.sparse_opt.zero_grad(set_to_none=set_to_none)
        self.dense_opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """After ``loss.backward()``: the sparse rows with this step's gradient, the dense parameters with
        the previous step's (none at the first step); this step's dense gradient is kept (and its
        all-reduce started) for the next call."""
        if self.sparse_opt is not None:
            if self.distributed:  # one blocking collective for all the tables (not one per table)
                flat = _flatten([_grad(p) for p in self.sparse])
                dist.all_reduce(flat)
                flat.div_(self.world_size)
                for p, g in zip(self.sparse, _unflatten(flat, self.sparse), strict=True):
                    p.grad = g
            self.sparse_opt.step()
        current = _flatten([_grad(p) for p in self.dense])
        handle = dist.all_reduce(current, async_op=True) if self.distributed else None
        if self._pending is not None:
            self._apply(self._pending, self._handle)
        self._pending, self._handle = current, handle

    def flush(self) -> None:
        """Apply the pending dense gradient (the last step's) now."""
        if self._pending is not None:
            self._apply(self._pending, self._handle)
            self._pending, self._handle = None, None

    def _apply(self, flat: torch.Tensor, handle: Any) -> None:
        if handle is not None:
            handle.wait()
            flat = flat / self.world_size
        for p, g in zip(self.dense, _unflatten(flat, self.dense), strict=True):
            p.grad = g
        self.dense_opt.step()

    def state_dict(self) -> dict[str, Any]:
        if self._handle is not None:  # a checkpoint holds the averaged pending gradient
            self._handle.wait()
            self._pending, self._handle = self._pending / self.world_size, None
        return {
            "sparse": self.sparse_opt.state_dict() if self.sparse_opt else None,
            "dense": self.dense_opt.state_dict(),
            "pending": self._pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sparse_opt is not None and state.get("sparse") is not None:
            self.sparse_opt.load_state_dict(state["sparse"])
        self.dense_opt.load_state_dict(state["dense"])
        self._pending, self._handle = state.get("pending"), None


def _grad(p: nn.Parameter) -> torch.Tensor:
    """The parameter's gradient, zeros when it took no part in the loss (as DDP reduces it)."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: torch.Tensor, like: list[nn.Parameter]) -> list[torch.Tensor]:
    out, at = [], 0
    for p in like:
        out.append(flat[at : at + p.numel()].view_as(p))  # views: the flat buffer is fresh every step
        at += p.numel()
    return out
