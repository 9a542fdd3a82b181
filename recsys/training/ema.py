"""An exponential-moving-average copy of a model: the teacher of SDFT-style self-distillation.

phi <- (1 - a) * phi + a * theta after every optimiser step (spec: Distillation, a ~ 0.01). Buffers (e.g.
normalisation statistics) are copied, not averaged, so the teacher always runs with the student's current
buffers. The teacher never receives gradients.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EmaTeacher:
    """Holds ``module``, a frozen deep copy of the student updated by :meth:`update`."""

    def __init__(self, student: nn.Module, decay_rate: float = 0.01) -> None:
        if not 0.0 < decay_rate <= 1.0:
            raise ValueError(f"decay_rate (the EMA step a) must be in (0, 1], got {decay_rate}")
        self.rate = decay_rate
        self.module = copy.deepcopy(student).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """phi <- (1 - a) phi + a theta for every parameter; buffers copied."""
        teacher_params = dict(self.module.named_parameters())
        for name, theta in student.named_parameters():
            phi = teacher_params[name]
            phi.mul_(1.0 - self.rate).add_(theta.detach().to(phi.dtype), alpha=self.rate)
        teacher_buffers = dict(self.module.named_buffers())
        for name, buf in student.named_buffers():
            teacher_buffers[name].copy_(buf)

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
