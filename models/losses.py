"""Losses used by the training code (models stay pure; training/ calls these).

Sampled softmax (the HSTU / SASRec retrieval loss): for every supervised position, the logits are the
positive item and ``num_negatives`` items drawn uniformly from all items, each
``cos(user, item) / temperature``; a negative that equals the positive is masked out; the loss is the mean
cross-entropy of the positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from core.config import FrozenModel


class SampledSoftmaxConfig(FrozenModel):
    num_negatives: int = Field(
        128, gt=0, description="Negatives per supervised position, uniform over items."
    )
    temperature: float = Field(0.05, gt=0.0, description="Logit = cosine similarity / temperature.")
    full_logits_max_items: int = Field(
        4096,
        ge=0,
        description="Catalogues up to this size compute all item logits with one matmul and gather the "
        "sampled ones (same value, faster on small catalogues); larger ones gather the sampled embeddings.",
    )


def sample_uniform_negatives(
    num_items: int,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Item indices drawn uniformly from 1..num_items (0 is padding), int64 of ``shape``.

    ``generator`` (if given) must live on ``device``.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    return torch.randint(1, num_items + 1, shape, generator=generator, device=device)


def sampled_softmax_loss(
    user: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    item_table: torch.Tensor,
    config: SampledSoftmaxConfig,
) -> torch.Tensor:
    """Mean sampled-softmax loss over P supervised positions.

    user [P, D] and item_table [num_items + 1, D] are expected L2-normalised (the models do it);
    positives [P] int64, negatives [P, K] int64.
    """
    if user.ndim != 2 or positives.shape != user.shape[:1] or negatives.shape[0] != user.shape[0]:
        raise ValueError(
            f"shapes must be user [P, D], positives [P], negatives [P, K]; got {tuple(user.shape)}, "
            f"{tuple(positives.shape)}, {tuple(negatives.shape)}"
        )
    if user.shape[0] == 0:
        return user.sum() * 0.0
    if item_table.shape[0] <= config.full_logits_max_items:
        all_logits = user @ item_table.T  # [P, num_items + 1]
        pos_logits = all_logits.gather(1, positives.unsqueeze(1))  # [P, 1]
        neg_logits = all_logits.gather(1, negatives)  # [P, K]
    else:
        pos_logits = (user * item_table[positives]).sum(-1, keepdim=True)  # [P, 1]
        neg_logits = torch.einsum("pd,pkd->pk", user, item_table[negatives])  # [P, K]
    neg_logits = neg_logits.masked_fill(negatives == positives.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logits, neg_logits], dim=1).float() / config.temperature  # [P, 1 + K]
    return -F.log_softmax(logits, dim=1)[:, 0].mean()
