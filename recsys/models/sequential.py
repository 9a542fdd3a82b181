"""Parts shared by the sequential retrieval models (SASRec, HSTU): the input stage and the item table.

Both models read the same right-padded batch and produce one user vector per position, L2-normalised unless
the config's ``normalize`` is off (then user and item vectors are raw: plain SASRec with a full softmax).
The score of item j for the user at position i is ``dot(user[i], item[j]) / temperature``; the temperature
belongs to the loss (``recsys.models.losses``) because it does not change a ranking, except a learned one,
which is a model parameter (``log_temperature``, present when the config's ``learned_temperature`` is set).

Batch layout (right-padded, item 0 is padding):
- ``items``    [B, N] int64: the history, oldest first;
- ``ts``       [B, N] int64: the time of each history item (unix seconds);
- ``query_ts`` [B, N] int64: the time of the item predicted at each position, i.e. ``ts[i + 1]``, and the
  target's (or the request's) time at the last valid position;
- ``lengths``  [B] int64: the number of valid positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension; a zero vector (padding) stays zero instead of becoming NaN."""
    return F.normalize(x, p=2.0, dim=-1, eps=L2_EPS)


def valid_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """[B] lengths -> [B, N] bool, True at the valid (left-aligned) positions."""
    return torch.arange(n, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class SequenceInput(nn.Module):
    """Item embedding * sqrt(D) + learned absolute position embedding, dropout, padding rows zeroed.

    Initialisation follows the public HSTU code: items truncated-normal std 0.02, positions truncated-normal
    std sqrt(1 / D). The item table is also the output table (tied), as in SASRec and HSTU.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        dim: int,
        dropout: float,
        *,
        normalize: bool = True,
        learned_temperature: float | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.normalize = normalize
        self.log_temperature = (
            nn.Parameter(torch.tensor(math.log(learned_temperature)))
            if learned_temperature is not None
            else None
        )
        self.max_len = max_len
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            nn.init.trunc_normal_(self.item_embedding.weight, std=0.02, a=-0.04, b=0.04)
            self.item_embedding.weight[0].zero_()
            std = math.sqrt(1.0 / dim)
            nn.init.trunc_normal_(self.position_embedding.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n = items.shape[1]
        if n > self.max_len:
            raise ValueError(f"items has {n} positions but the model's max_len is {self.max_len}")
        positions = torch.arange(n, device=items.device)
        x = self.item_embedding(items) * math.sqrt(self.dim) + self.position_embedding(positions)  # [B, N, D]
        x = self.dropout(x)
        return x * valid_mask(lengths, n).unsqueeze(-1).to(x.dtype)

    def item_vectors(self) -> torch.Tensor:
        """[num_items + 1, D] item table, L2-normalised if ``normalize`` (row 0, padding, is zero)."""
        w = self.item_embedding.weight
        return l2_normalize(w) if self.normalize else w

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The user vectors the encoder hands out: L2-normalised if ``normalize``."""
        return l2_normalize(x) if self.normalize else x

    def score_scale(self) -> torch.Tensor | None:
        """1 / learned temperature (a scalar tensor), or None when the temperature is the loss's constant."""
        return None if self.log_temperature is None else torch.exp(-self.log_temperature)


def last_valid(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> [B, D]: the vector at each row's last valid position (the user's current state)."""
    index = (lengths - 1).clamp(min=0)
    return x[torch.arange(x.shape[0], device=x.device), index]
