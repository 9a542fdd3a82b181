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

from recsys.core.config import FrozenModel


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


def soft_bce_with_logits(student: torch.Tensor, target_prob: torch.Tensor) -> torch.Tensor:
    """Elementwise BCE(target_prob, sigmoid(student)), numerically stable in logit space."""
    return F.binary_cross_entropy_with_logits(student, target_prob, reduction="none")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    weight: float = 0.5,
    labelled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher -> student loss of the spec, averaged over the batch.

    loss = mean_labelled BCE(y, s(z_s)) + weight * tau^2 * mean_all BCE(s(z_t/tau), s(z_s/tau))

    ``labelled`` (bool, same shape) marks the examples that have a label: the hard term averages over those,
    the soft term over every example, so teacher scores on unlabelled candidates still teach.
    tau = 1 keeps the student calibrated; tau^2 keeps the soft gradient's scale independent of tau.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if student_logits.shape != teacher_logits.shape or student_logits.shape != labels.shape:
        raise ValueError(
            f"student_logits, teacher_logits and labels must share a shape; got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}, {tuple(labels.shape)}"
        )
    z_s = student_logits.float()
    teacher_prob = torch.sigmoid(teacher_logits.detach().float() / temperature)
    soft = soft_bce_with_logits(z_s / temperature, teacher_prob).mean()
    hard_all = soft_bce_with_logits(z_s, labels.float())
    if labelled is None:
        hard = hard_all.mean()
    else:
        mask = labelled.to(torch.bool)
        hard = hard_all[mask].mean() if bool(mask.any()) else z_s.sum() * 0.0
    return hard + weight * temperature**2 * soft


def self_distillation_loss(
    student_logits: torch.Tensor,
    privileged_logits: torch.Tensor,
    teacher_privileged_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 1.0,
    kl_weight: float = 0.0,
) -> torch.Tensor:
    """SDFT-style loss (spec: Distillation) for one network trained with and without privileged context.

    loss = BCE(y, p_theta(x)) + beta * BCE(y, p_theta(x, x*)) + kl_weight * KL(p_phi(x, x*) || p_theta(x))

    ``student_logits`` = the network on the served inputs x; ``privileged_logits`` = the same network with the
    privileged context x*; ``teacher_privileged_logits`` = the EMA teacher phi with x* (no gradient).
    The KL is the forward KL between Bernoulli distributions, averaged over the batch.
    """
    if beta < 0 or kl_weight < 0:
        raise ValueError(f"beta and kl_weight must be >= 0, got beta={beta}, kl_weight={kl_weight}")
    y = labels.float()
    loss = soft_bce_with_logits(student_logits.float(), y).mean()
    if beta > 0:
        loss = loss + beta * soft_bce_with_logits(privileged_logits.float(), y).mean()
    if kl_weight > 0:
        p = torch.sigmoid(teacher_privileged_logits.detach().float())
        # KL(Bern(p) || Bern(q)) = BCE(p, q) - H(p): H(p) has no gradient but keeps the value exact.
        entropy = soft_bce_with_logits(teacher_privileged_logits.detach().float(), p)
        kl = soft_bce_with_logits(student_logits.float(), p) - entropy
        loss = loss + kl_weight * kl.mean()
    return loss
