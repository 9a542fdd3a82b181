"""Multi-task heads: one small tower per task (click, like, ...) over a shared representation.

Every ranking model ends in ``TaskHeads`` built for ``FeatureSpec.tasks``: a single task is the plain CTR
case, several tasks share the whole network below the towers (shared-bottom multi-task learning; OPEN in
the specs, picked as the simplest sound choice). Each tower returns a pre-sigmoid logit [B].
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.models.layers import MLP


class HeadsConfig(FrozenModel):
    hidden: tuple[int, ...] = Field((64,), description="Hidden widths of each task's tower.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class TaskHeads(nn.Module):
    def __init__(self, in_dim: int, tasks: tuple[str, ...], config: HeadsConfig) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("TaskHeads needs at least one task")
        self.towers = nn.ModuleDict({t: MLP(in_dim, config.hidden, 1, config.dropout) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {task: tower(x).squeeze(-1) for task, tower in self.towers.items()}  # task -> [B]
