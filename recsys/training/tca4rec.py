"""TCA4Rec (arXiv 2601.18457): token-level collaborative alignment of a generative title recommender.

- ``TitleTrie``: a prefix trie over each item's title tokens followed by ``<eos>``. A node is a prefix
  y_<j; the items under it are C(y_<j); a terminal node (reached by ``<eos>``) holds the item(s) with exactly
  that title (duplicate titles share one).
- Collaborative tokenizer (``TitleTrie.soft_labels``): given CF logits z_{u,i} (SASRec's user-item scores
  divided by a temperature), pi_{u,i} = softmax of z over C(y_<j), and p_u(v | y_<j) = sum of pi_{u,i} over
  the items in the child reached by token v. One sparse matmul gives every node's exp-mass, so a batch costs
  one product plus a gather over the children of the supervised prefixes.
- Loss: (1 - alpha) * cross-entropy(one-hot next token) + alpha * cross-entropy(p_u), the latter being the
  KL to the CF distribution up to a constant. alpha = 0 is the next-token-only baseline.
- ``beam_search``: decoding constrained to the trie (only tokens that continue a real title; log-probs
  renormalised over them) and to items outside the user's history; finished hypotheses are items, ranked by
  title log-probability. ``generative_score_fn`` turns the ranked list into full-ranking scores for
  ``evaluation.retrieval.evaluate_retrieval`` (items the beam did not reach tie at the bottom).

Training examples: every position t >= 1 of each user's training part (the leave-one-out split): the prompt is
the titles of the ``history_items`` items before t, the answer the title of item t; the CF teacher reads the
``cf_history`` items before t. Each epoch draws ``examples_per_epoch`` of them (all when None) at random.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.evaluation.retrieval import EvalBatch, ScoreFn
from recsys.models.title_lm import LOCAL_SPECIAL_IDS, CausalTitleLM, SpecialIds

PAD_ID, SEP_ID, ANS_ID, EOS_ID = (
    LOCAL_SPECIAL_IDS.pad,
    LOCAL_SPECIAL_IDS.sep,
    LOCAL_SPECIAL_IDS.ans,
    LOCAL_SPECIAL_IDS.eos,
)

#: [B, L] item histories (0-padded on the right) and their lengths -> [B, num_items + 1] CF logits.
CFScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TitleTrie:
    """Prefix trie over ``title tokens + <eos>`` of items 1..n (``titles[i - 1]`` is item i's token list)."""

    def __init__(self, titles: Sequence[Sequence[int]], special: SpecialIds = LOCAL_SPECIAL_IDS) -> None:
        self.special = special
        if not titles:
            raise ValueError("titles: the trie needs at least one item")
        self.num_items = len(titles)
        children: list[dict[int, int]] = [{}]
        self.paths: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # item 0 (padding): root only
        terminal_items: dict[int, list[int]] = {}
        for item, tokens in enumerate(titles, start=1):
            if not tokens or any(int(t) in special.all for t in tokens):
                raise ValueError(f"titles[{item - 1}]: empty or contains a special token id")
            node, path = 0, [0]
            for tok in [*map(int, tokens), special.eos]:
                nxt = children[node].get(tok)
                if nxt is None:
                    nxt = len(children)
                    children[node][tok] = nxt
                    children.append({})
                node = nxt
                path.append(node)
            terminal_items.setdefault(node, []).append(item)
            self.paths.append(np.asarray(path, dtype=np.int64))
        self.num_nodes = len(children)
        self.children = children
        self.terminal_items = terminal_items
        self.max_depth = max(len(p) - 1 for p in self.paths)
        # CSR of children: child_ptr[n]..child_ptr[n + 1] index child_node / child_token.
        counts = np.asarray([len(c) for c in children], dtype=np.int64)
        self.child_ptr = np.concatenate([[0], np.cumsum(counts)])
        self.child_node = np.asarray([c for ch in children for c in ch.values()], dtype=np.int64)
        self.child_token = np.asarray([t for ch in children for t in ch], dtype=np.int64)
        # membership[n, i] = 1 when item i lies under node n (every node on its path).
        rows = np.concatenate(self.paths[1:])
        cols = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(self.paths) if i])
        self.membership = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, cols])),
            torch.ones(len(rows), dtype=torch.float64),
            (self.num_nodes, self.num_items + 1),
            check_invariants=True,
        ).coalesce()
        self.subtree_count = np.bincount(rows, minlength=self.num_nodes).astype(np.int64)

    def walk(self, prefix: Sequence[int]) -> int:
        """Node of a token prefix; KeyError when no title starts with it."""
        node = 0
        for tok in prefix:
            node = self.children[node][int(tok)]
        return node

    def soft_labels(
        self, cf_logits: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor, vocab_size: int
    ) -> torch.Tensor:
        """[P, V] token-level CF distributions p_u(v | prefix), one per (row of ``cf_logits``, prefix node).

        ``cf_logits`` [B, num_items + 1] (column 0 ignored); ``rows``, ``nodes`` [P].
        """
        # float64 with the row max subtracted (softmax is shift-invariant), floored at -700 so that no node's
        # mass underflows to 0 (a node whose items all sit > 700 below the row max is split by item count).
        z = cf_logits.double()[:, 1:]
        weights = torch.exp((z - z.max(dim=1, keepdim=True).values).clamp(min=-700.0))  # [B, I]
        weights = torch.cat([torch.zeros_like(weights[:, :1]), weights], dim=1)  # [B, I + 1]
        mass = torch.sparse.mm(self.membership, weights.T).T  # [B, N]: exp-mass under every node
        ptr = torch.from_numpy(self.child_ptr)
        nodes_cpu = nodes.cpu()
        counts = ptr[nodes_cpu + 1] - ptr[nodes_cpu]  # [P]
        owner = torch.repeat_interleave(torch.arange(len(nodes_cpu)), counts)  # [C]
        start = torch.repeat_interleave(ptr[nodes_cpu] - torch.cumsum(counts, 0) + counts, counts)
        flat = start + torch.arange(int(counts.sum()))  # index into the CSR arrays
        child = torch.from_numpy(self.child_node)[flat]
        token = torch.from_numpy(self.child_token)[flat]
        row_of = rows.cpu()[owner]
        share = mass[row_of, child] / mass[row_of, nodes_cpu[owner]]
        out = torch.zeros(len(nodes_cpu), vocab_size)
        out[owner, token] = share.float()
        return out.to(cf_logits.device)


class TCATrainConfig(FrozenModel):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the CF soft label; 0 = next-token only.")
    cf_temperature: float = Field(0.05, gt=0.0, description="z = CF score / temperature (SASRec's 0.05).")
    history_items: int = Field(10, gt=0, description="Titles in the prompt (10, as the paper).")
    prompt_title_tokens: int = Field(16, gt=0, description="A history title is cut to this many tokens.")
    cf_history: int = Field(50, gt=0, description="Items the CF teacher reads.")
    epochs: int = Field(3, ge=1)
    examples_per_epoch: int | None = Field(20000, gt=0, description="None = every training position.")
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    beam_width: int = Field(20, ge=1, description="Items returned by beam search (>= the largest K).")
    seed: int = 0


@dataclass(frozen=True)
class Example:
    history: np.ndarray  # items before the target, oldest first
    target: int


def training_examples(train_items: Sequence[np.ndarray]) -> list[Example]:
    return [Example(items[:t], int(items[t])) for items in train_items for t in range(1, len(items))]


class PromptBuilder:
    """Token ids of prompts (history titles) and answers (target title + ``<eos>``)."""

    def __init__(
        self,
        title_tokens: Sequence[Sequence[int]],
        config: TCATrainConfig,
        special: SpecialIds = LOCAL_SPECIAL_IDS,
    ) -> None:
        self.titles = [list(map(int, t)) for t in title_tokens]  # item i at index i - 1
        self.config = config
        self.special = special

    def prompt(self, history: np.ndarray) -> list[int]:
        out: list[int] = []
        for k, item in enumerate(history[-self.config.history_items :]):
            if k:
                out.append(self.special.sep)
            out += self.titles[int(item) - 1][: self.config.prompt_title_tokens]
        out.append(self.special.ans)
        return out

    def answer(self, item: int) -> list[int]:
        return [*self.titles[item - 1], self.special.eos]


@dataclass(frozen=True)
class LMBatch:
    tokens: torch.Tensor  # [B, T] prompt + answer[:-1], right-padded
    positions: torch.Tensor  # [P, 2] (row, column) of every supervised position
    labels: torch.Tensor  # [P] next token
    nodes: torch.Tensor  # [P] trie node of the answer prefix before that token
    cf_items: torch.Tensor  # [B, L] CF teacher input, right-padded
    cf_lengths: torch.Tensor  # [B]


def make_batch(examples: Sequence[Example], prompts: PromptBuilder, trie: TitleTrie, cf_len: int) -> LMBatch:
    seqs, pos, labels, nodes = [], [], [], []
    for r, ex in enumerate(examples):
        prompt, answer = prompts.prompt(ex.history), prompts.answer(ex.target)
        seqs.append(prompt + answer[:-1])
        path = trie.paths[ex.target]
        for j, tok in enumerate(answer):
            pos.append((r, len(prompt) - 1 + j))
            labels.append(tok)
            nodes.append(int(path[j]))
    width = max(len(s) for s in seqs)
    tokens = np.full((len(seqs), width), prompts.special.pad, dtype=np.int64)
    for r, s in enumerate(seqs):
        tokens[r, : len(s)] = s
    hist = [ex.history[-cf_len:] for ex in examples]
    cf_items = np.zeros((len(hist), max(1, max(len(h) for h in hist))), dtype=np.int64)
    for r, h in enumerate(hist):
        cf_items[r, : len(h)] = h
    return LMBatch(
        torch.from_numpy(tokens),
        torch.tensor(pos, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(nodes, dtype=torch.long),
        torch.from_numpy(cf_items),
        torch.tensor([len(h) for h in hist], dtype=torch.long),
    )


def tca_loss(
    model: CausalTitleLM,
    batch: LMBatch,
    trie: TitleTrie,
    config: TCATrainConfig,
    cf_scorer: CFScorer | None,
) -> torch.Tensor:
    hidden, _ = model(batch.tokens)
    logp = F.log_softmax(model.logits(hidden[batch.positions[:, 0], batch.positions[:, 1]]), dim=-1)  # [P, V]
    hard = F.nll_loss(logp, batch.labels)
    if config.alpha == 0.0:
        return hard
    if cf_scorer is None:
        raise ValueError("alpha > 0 needs a CF scorer (the collaborative teacher)")
    with torch.no_grad():
        z = cf_scorer(batch.cf_items, batch.cf_lengths) / config.cf_temperature
        soft = trie.soft_labels(z, batch.positions[:, 0], batch.nodes, logp.shape[-1])
    return (1.0 - config.alpha) * hard - config.alpha * (soft * logp).sum(dim=-1).mean()


@dataclass
class LMTrainResult:
    losses: list[float]  # mean loss per epoch
    train_time_s: float
    num_parameters: int


def train_title_lm(
    model: CausalTitleLM,
    train_items: Sequence[np.ndarray],
    prompts: PromptBuilder,
    trie: TitleTrie,
    config: TCATrainConfig,
    cf_scorer: CFScorer | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> LMTrainResult:
    """Train ``model`` in place with AdamW for ``config.epochs`` epochs (seeded); returns per-epoch losses."""
    examples = training_examples(train_items)
    if not examples:
        raise ValueError("train_items: no user has 2 or more training interactions")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = min(config.examples_per_epoch or len(examples), len(examples))
    steps = config.epochs * math.ceil(per_epoch / config.batch_size)
    warmup = max(1, steps // 10)
    # Linear warm-up over the first tenth of the steps, then a cosine decay to 0.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )
    started = time.perf_counter()
    losses: list[float] = []
    model.train()
    for epoch in range(config.epochs):
        order = rng.permutation(len(examples))[:per_epoch]
        total, count = 0.0, 0
        for s in range(0, per_epoch, config.batch_size):
            batch = make_batch(
                [examples[i] for i in order[s : s + config.batch_size]], prompts, trie, config.cf_history
            )
            loss = tca_loss(model, batch, trie, config, cf_scorer)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / count)
        if progress is not None:
            progress(
                f"epoch {epoch + 1}/{config.epochs}: loss {losses[-1]:.4f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    model.eval()
    return LMTrainResult(losses, time.perf_counter() - started, sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def beam_search(
    model: CausalTitleLM, prompt: Sequence[int], trie: TitleTrie, width: int, exclude: Sequence[int] = ()
) -> list[tuple[int, float]]:
    """Up to ``width`` (item, log-prob) pairs, best first, decoded only along titles of non-excluded items.

    Duplicate titles share a terminal node: each such item is returned with the same log-prob.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    excluded = {int(i) for i in exclude if 1 <= int(i) <= trie.num_items}
    remaining = trie.subtree_count.copy()  # items still reachable under each node
    if excluded:
        np.subtract.at(remaining, np.concatenate([trie.paths[i] for i in excluded]), 1)
    if remaining[0] == 0:
        return []
    hidden, cache = model(torch.tensor([list(prompt)], dtype=torch.long))
    last = hidden[:, -1]  # [beams, D]
    beams = [(0, 0.0)]  # (node, log-prob)
    finished: list[tuple[int, float]] = []
    for _ in range(trie.max_depth):
        logits = model.logits(last)  # [beams, V]
        candidates: list[tuple[float, int, int, int]] = []  # (score, beam, child, token)
        for b, (node, score) in enumerate(beams):
            lo, hi = trie.child_ptr[node], trie.child_ptr[node + 1]
            kids, toks = trie.child_node[lo:hi], trie.child_token[lo:hi]
            # Normalised over every real continuation, so a title's score does not depend on the history;
            # branches holding only excluded items are then pruned from the search.
            logp = torch.log_softmax(logits[b, torch.from_numpy(toks)], dim=0).tolist()
            candidates += [
                (score + lp, b, int(c), int(t))
                for lp, c, t in zip(logp, kids, toks, strict=True)
                if remaining[c] > 0
            ]
        candidates.sort(key=lambda c: -c[0])
        live: list[tuple[float, int, int, int]] = []
        for cand in candidates:
            if cand[3] == trie.special.eos:
                finished += [(i, cand[0]) for i in trie.terminal_items[cand[2]] if i not in excluded]
            elif len(live) < width:
                live.append(cand)
        finished.sort(key=lambda f: -f[1])
        # Log-probs only fall as titles grow: stop once no live beam can enter the top ``width``.
        if not live or (len(finished) >= width and live[0][0] <= finished[width - 1][1]):
            break
        index = torch.tensor([c[1] for c in live], dtype=torch.long)
        past = model.reorder_cache(cache, index)
        hidden, cache = model(torch.tensor([[c[3]] for c in live], dtype=torch.long), past)
        last = hidden[:, -1]
        beams = [(c[2], c[0]) for c in live]
    return finished[:width]


def generative_score_fn(
    model: CausalTitleLM, prompts: PromptBuilder, trie: TitleTrie, width: int, *, floor: float = -1e9
) -> ScoreFn:
    """Full-ranking scores from the beam: its items get their log-prob, every other item ``floor``.

    The batch's ``items`` window is the prompt history; ``exclude`` (the whole history) is kept out of the
    beam, as the protocol excludes it from the ranking.
    """

    def scores(batch: EvalBatch) -> torch.Tensor:
        out = torch.full((batch.items.shape[0], trie.num_items + 1), floor)
        items, lengths, exclude = batch.items.cpu().numpy(), batch.lengths.cpu().numpy(), batch.exclude.cpu()
        for r in range(items.shape[0]):
            history = items[r, : lengths[r]]
            ex = exclude[r][exclude[r] > 0].tolist()
            for item, lp in beam_search(model, prompts.prompt(history), trie, width, ex):
                out[r, item] = lp
        return out

    return scores


def sasrec_cf_scorer(model: nn.Module) -> CFScorer:
    """CF logits from a trained SASRec: the user vector at the last valid position against every item."""
    from recsys.models.sequential import last_valid

    model.eval()

    def score(items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(items)
        users = model(items, zeros, zeros, lengths)  # [B, L, D]
        return last_valid(users, lengths) @ model.item_vectors().T  # [B, num_items + 1]

    return score
