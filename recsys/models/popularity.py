"""Popularity baseline: every user gets the same scores, the item's interaction count in the training part.

The counts are a buffer (saved with the weights); ``training.retrieval.fit_popularity`` fills them. Under
the retrieval protocol the user's own history is excluded, so the ranking differs per user only through that.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel


class PopularityConfig(FrozenModel):
    num_items: int = Field(gt=0, description="Number of items; indices 1..num_items, 0 is padding.")


class Popularity(nn.Module):
    counts: torch.Tensor

    def __init__(self, config: PopularityConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("counts", torch.zeros(config.num_items + 1, dtype=torch.float32))

    def load_counts(self, counts: torch.Tensor) -> None:
        """Set the per-item counts ([num_items + 1], index 0 = padding, ignored)."""
        if counts.shape != self.counts.shape:
            raise ValueError(f"counts must have shape {tuple(self.counts.shape)}, got {tuple(counts.shape)}")
        if bool((counts < 0).any()):
            raise ValueError("counts must be non-negative")
        self.counts.copy_(counts.to(self.counts.dtype))

    def forward(self, batch_size: int) -> torch.Tensor:
        """[batch_size, num_items + 1] scores (the padding column is -inf: never a candidate)."""
        scores = self.counts.clone()
        scores[0] = float("-inf")
        return scores.unsqueeze(0).expand(batch_size, -1)
