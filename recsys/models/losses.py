"""Losses used by the training code (models stay pure; training/ calls these).

Retrieval objectives (``RetrievalObjective``, chosen in ``training.retrieval.RetrievalTrainConfig.loss``);
every score is ``dot(user, item) * scale`` with ``scale`` = 1 / temperature (fixed, or the model's learned
one), on L2-normalised vectors or raw ones (the objective's ``normalize``, applied by the model):

- ``FullSoftmaxConfig``: cross-entropy of the positive over the whole catalogue (items 1..N), computed in item
  chunks with a running logsumexp and recomputed chunk by chunk in the backward pass, so memory is
  O(positions x chunk) however large the catalogue.
- ``SampledSoftmaxConfig``: the positive and K negatives; negatives uniform over items (per position), drawn
  from the batch's positives (in-batch: shared by every position of the step, so popularity-distributed), or
  mixed; optional logQ correction (Yi et al. 2019) subtracts log q(item) of the proposal from every logit.
  A negative equal to the positive is masked. The GR paper's recipe: 128 uniform, L2, temperature 0.05.
- ``GBCEConfig``: gSASRec's generalised BCE (Petrov & Macdonald, RecSys 2023): per position
  (beta * softplus(-s+) + sum_k softplus(s_k)) / (1 + K), beta = alpha * (t * (1 - 1/alpha) + 1/alpha),
  alpha = K / (N - 1); t = 0 is plain BCE, t = 1 makes sigma(s) calibrated to the full-catalogue probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from recsys.core.config import FrozenModel


class FullSoftmaxConfig(FrozenModel):
    kind: Literal["full_softmax"] = "full_softmax"
    normalize: bool = Field(False, description="L2-normalise user and item vectors (then set temperature).")
    temperature: float = Field(1.0, gt=0.0, description="Logit = dot / temperature.")
    learn_temperature: bool = Field(False, description="Learn the temperature (starts at `temperature`).")
    chunk_size: int = Field(
        8192, gt=0, description="Items per chunk of the logsumexp: memory is positions x chunk_size floats."
    )


class SampledSoftmaxConfig(FrozenModel):
    kind: Literal["sampled_softmax"] = "sampled_softmax"
    num_negatives: int = Field(128, gt=0, le=65536, description="Negatives per supervised position.")
    negatives: Literal["uniform", "in_batch", "mixed"] = Field(
        "uniform",
        description="uniform over items per position; in_batch: drawn from the step's positives and shared "
        "by its positions; mixed: in_batch_fraction of them in-batch, the rest uniform.",
    )
    in_batch_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Share of in-batch negatives (mixed).")
    logq_correction: bool = Field(False, description="Subtract log q(item) of the proposal from each logit.")
    normalize: bool = Field(True, description="L2-normalise user and item vectors.")
    temperature: float = Field(0.05, gt=0.0, description="Logit = dot / temperature.")
    learn_temperature: bool = Field(False, description="Learn the temperature (starts at `temperature`).")
    full_logits_max_items: int = Field(
        4096,
        ge=0,
        description="Catalogues up to this size compute all item logits with one matmul and gather the "
        "sampled ones (same value, faster on small catalogues); larger ones gather the sampled embeddings.",
    )


class GBCEConfig(FrozenModel):
    kind: Literal["gbce"] = "gbce"
    num_negatives: int = Field(256, gt=0, le=65536, description="Uniform negatives per supervised position.")
    calibration: float = Field(0.75, ge=0.0, le=1.0, description="gSASRec's t (0 = BCE, 1 = calibrated).")
    normalize: bool = Field(False, description="L2-normalise user and item vectors (then set temperature).")
    temperature: float = Field(1.0, gt=0.0, description="Logit = dot / temperature.")
    learn_temperature: bool = Field(False, description="Learn the temperature (starts at `temperature`).")


RetrievalObjective = Annotated[
    FullSoftmaxConfig | SampledSoftmaxConfig | GBCEConfig, Field(discriminator="kind")
]


def gbce_beta(num_negatives: int, num_items: int, calibration: float) -> float:
    """gSASRec's beta = alpha * (t * (1 - 1/alpha) + 1/alpha), alpha = negatives / (num_items - 1)."""
    if num_items < 2:
        raise ValueError(f"num_items must be >= 2 for gBCE, got {num_items}")
    alpha = num_negatives / (num_items - 1)
    return alpha * (calibration * (1.0 - 1.0 / alpha) + 1.0 / alpha)


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


@dataclass(frozen=True)
class Negatives:
    """The negatives of one step: ``per_position`` [P, Ku] and/or ``shared`` [Kb] (every position's), and
    ``log_q`` [num_items + 1], the log-probability of each item under the proposal (None: no correction)."""

    per_position: torch.Tensor | None
    shared: torch.Tensor | None
    log_q: torch.Tensor | None = None


def draw_negatives(
    config: SampledSoftmaxConfig,
    positives: torch.Tensor,
    num_items: int,
    *,
    generator: torch.Generator | None = None,
) -> Negatives:
    """Negatives for the positions whose positives are ``positives`` [P], per ``config.negatives``.

    In-batch negatives are positives of the step drawn uniformly (so item j with c_j of the P positives has
    probability c_j / P); the proposal of one negative slot is q_j = f_b * c_j / P + (1 - f_b) / N.
    """
    device = positives.device
    p, k = positives.shape[0], config.num_negatives
    k_batch = {"uniform": 0, "in_batch": k, "mixed": max(1, min(k - 1, round(k * config.in_batch_fraction)))}
    kb = k_batch[config.negatives]
    per_position = (
        sample_uniform_negatives(num_items, (p, k - kb), generator=generator, device=device)
        if kb < k
        else None
    )
    shared = None
    if kb > 0:
        if p == 0:
            shared = torch.zeros(0, dtype=torch.long, device=device)
        else:
            index = torch.randint(0, p, (kb,), generator=generator, device=device)
            shared = positives[index]
    log_q = None
    if config.logq_correction:
        counts = torch.bincount(positives, minlength=num_items + 1).to(torch.float64)
        f_b = kb / k
        q = f_b * counts / max(p, 1) + (1.0 - f_b) / num_items
        q[0] = 1.0  # padding is never scored
        log_q = q.log().float()
    return Negatives(per_position, shared, log_q)


def _scale_of(temperature: float, scale: torch.Tensor | float | None) -> torch.Tensor | float:
    return 1.0 / temperature if scale is None else scale


def _check_shapes(user: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None) -> None:
    if (
        user.ndim != 2
        or positives.shape != user.shape[:1]
        or (negatives is not None and negatives.shape[0] != user.shape[0])
    ):
        neg = None if negatives is None else tuple(negatives.shape)
        raise ValueError(
            f"shapes must be user [P, D], positives [P], negatives [P, K]; got {tuple(user.shape)}, "
            f"{tuple(positives.shape)}, {neg}"
        )


def _sampled_logits(
    user: torch.Tensor,
    positives: torch.Tensor,
    negatives: Negatives,
    item_table: torch.Tensor,
    full_logits_max_items: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unscaled float logits: positive [P, 1], negatives [P, K] (hits on the positive -inf), and their
    item ids [P, K] (for logQ)."""
    parts, ids = [], []
    if item_table.shape[0] <= full_logits_max_items:
        all_logits = user @ item_table.T  # [P, num_items + 1]
        pos = all_logits.gather(1, positives.unsqueeze(1))  # [P, 1]
        if negatives.per_position is not None:
            parts.append(all_logits.gather(1, negatives.per_position))  # [P, Ku]
    else:
        pos = (user * item_table[positives]).sum(-1, keepdim=True)  # [P, 1]
        if negatives.per_position is not None:
            parts.append(torch.einsum("pd,pkd->pk", user, item_table[negatives.per_position]))  # [P, Ku]
    if negatives.per_position is not None:
        ids.append(negatives.per_position)
    if negatives.shared is not None:
        parts.append(user @ item_table[negatives.shared].T)  # [P, Kb]
        ids.append(negatives.shared.unsqueeze(0).expand(user.shape[0], -1))
    neg_ids = torch.cat(ids, dim=1)  # [P, K]
    neg = torch.cat(parts, dim=1).masked_fill(neg_ids == positives.unsqueeze(1), float("-inf"))
    return pos.float(), neg.float(), neg_ids


def sampled_softmax_loss(
    user: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | Negatives,
    item_table: torch.Tensor,
    config: SampledSoftmaxConfig,
    *,
    scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean sampled-softmax loss over P supervised positions.

    user [P, D] and item_table [num_items + 1, D] (L2-normalised when ``config.normalize``; the models do
    it); positives [P] int64; negatives [P, K] int64 uniform ones, or a ``draw_negatives`` result.
    ``scale`` multiplies every dot product (None: 1 / config.temperature).
    """
    if isinstance(negatives, torch.Tensor):
        negatives = Negatives(negatives, None)
    _check_shapes(user, positives, negatives.per_position)
    if user.shape[0] == 0:
        return user.sum() * 0.0
    s = _scale_of(config.temperature, scale)
    pos, neg, neg_ids = _sampled_logits(user, positives, negatives, item_table, config.full_logits_max_items)
    pos, neg = pos * s, neg * s
    if negatives.log_q is not None:
        pos = pos - negatives.log_q[positives].unsqueeze(1)
        neg = neg - negatives.log_q[neg_ids]
    logits = torch.cat([pos, neg], dim=1)  # [P, 1 + K]
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def gbce_loss(
    user: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    item_table: torch.Tensor,
    config: GBCEConfig,
    *,
    scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean gBCE over P positions (module docstring); negatives [P, K] uniform, hits on the positive
    contribute nothing. N (for alpha) = item_table rows - 1."""
    _check_shapes(user, positives, negatives)
    if user.shape[0] == 0:
        return user.sum() * 0.0
    beta = gbce_beta(negatives.shape[1], item_table.shape[0] - 1, config.calibration)
    s = _scale_of(config.temperature, scale)
    pos, neg, _ = _sampled_logits(user, positives, Negatives(negatives, None), item_table, 4096)
    pos, neg = pos * s, neg * s
    neg_term = F.softplus(neg).masked_fill(torch.isinf(neg), 0.0).sum(1)  # [P]
    per_position = (beta * F.softplus(-pos[:, 0]) + neg_term) / (1 + negatives.shape[1])
    return per_position.mean()


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Sum over positions of CE(positive | all items 1..N), items visited in chunks; backward recomputes
    each chunk's softmax instead of storing P x N probabilities."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        user: torch.Tensor,
        table: torch.Tensor,
        scale: torch.Tensor,
        positives: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        n = table.shape[0]
        lse = torch.full((user.shape[0],), float("-inf"), dtype=torch.float32, device=user.device)
        for start in range(1, n, chunk_size):  # row 0 is padding, never a class
            logits = (user @ table[start : start + chunk_size].T).float() * scale  # [P, c]
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        pos = (user * table[positives]).sum(-1).float() * scale  # [P]
        ctx.save_for_backward(user, table, scale, positives, lse)
        ctx.chunk_size = chunk_size
        return (lse - pos).sum()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        user, table, scale, positives, lse = ctx.saved_tensors
        chunk_size: int = ctx.chunk_size  # type: ignore[attr-defined]
        uf, tf = user.float(), table.float()
        grad_user = torch.zeros_like(uf)
        grad_table = torch.zeros_like(tf)
        expected_dot = torch.zeros((), dtype=torch.float32, device=user.device)  # sum_p E_softmax[u . i]
        for start in range(1, tf.shape[0], chunk_size):
            rows = tf[start : start + chunk_size]  # [c, D]
            dots = uf @ rows.T  # [P, c]
            prob = torch.exp(dots * scale - lse.unsqueeze(1))  # [P, c]
            grad_user += prob @ rows
            grad_table[start : start + chunk_size] = prob.T @ uf
            expected_dot += (prob * dots).sum()
        pos_rows = tf[positives]  # [P, D]
        grad_user -= pos_rows
        grad_table.index_add_(0, positives, -uf)
        grad_scale = (expected_dot - (uf * pos_rows).sum()) * grad
        g = grad * scale
        return (
            (grad_user * g).to(user.dtype),
            (grad_table * g).to(table.dtype),
            grad_scale.to(scale.dtype).reshape(scale.shape),
            None,
            None,
        )


def full_softmax_loss(
    user: torch.Tensor,
    positives: torch.Tensor,
    item_table: torch.Tensor,
    config: FullSoftmaxConfig,
    *,
    scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the positive over every item 1..N (item_table [N + 1, D], row 0 padding).

    Catalogues up to ``config.chunk_size`` items take one fused ``cross_entropy``; larger ones the chunked
    logsumexp (same value and gradients, memory bounded by positions x chunk_size).
    """
    _check_shapes(user, positives, None)
    if user.shape[0] == 0:
        return user.sum() * 0.0
    if bool((positives < 1).any()) or bool((positives >= item_table.shape[0]).any()):
        raise ValueError(f"positives must be item ids in 1..{item_table.shape[0] - 1}")
    s = _scale_of(config.temperature, scale)
    num_items = item_table.shape[0] - 1
    if num_items <= config.chunk_size:
        logits = (user @ item_table[1:].T).float() * s  # [P, N]
        return F.cross_entropy(logits, positives - 1)
    s_t = s if isinstance(s, torch.Tensor) else torch.tensor(float(s), device=user.device)
    total = _ChunkedSoftmaxCE.apply(user, item_table, s_t.float(), positives, config.chunk_size)
    return total / user.shape[0]


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
