"""Generative retrieval over semantic IDs (TIGER-style) with V-STAR's value-guided decoding and Sibling-GRPO.

Generator: a decoder-only causal transformer reads the user's history as semantic-ID tokens
(``BOS, c1(i1), c2(i1), c3(i1), c4(i1), c1(i2), ...``; each level has its own slice of the vocabulary) and
predicts the next token; the next item's codes are generated one level at a time. Histories are left-padded
and positions count from the first real token, so training windows and decoding prefixes line up. Decoding
encodes the history once (keys/values cached) and runs only the prefix tokens per candidate.

Constrained decoding: ``PrefixTrie`` holds every real item's code; at each level the policy's logits are
masked to the trie children of the prefix (log-softmax over those), so only real items come out.

Model calls: evaluating the policy at one prefix node (one row of one decoding step) is one call; beam
search of width B over L tokens costs 1 + (L - 1) * B calls (the last level's children are leaves: scored
with their parent's call). Every leaf under an evaluated last-level node is a candidate; the ranked list is
the candidates by sequence log-probability.

V-STAR (spec: models.md): a value head V(s) on the hidden state of prefix s, trained on observed rewards
(target gamma^(L - depth) * R). Value-guided decoding (``value_guided_search``): a beam search of width
``beam`` builds a shallow tree; then, until the call budget is spent, the evaluated node with the highest
G(s) = V(s) + lambda * H(s) (H = entropy of the constrained policy at s) that still has unexplored children
is branched: its most probable unexplored child is evaluated and followed greedily down to the leaves.
RL fine-tuning (``rl_loss``): for each user G candidates are sampled from the constrained policy; GRPO uses
A_i = (R_i - mean_G R) / (std_G R + eps) on every token of candidate i; Sibling-GRPO groups the tree nodes
that share a parent prefix: a node's reward is the mean reward of the candidates through it, its advantage
(R_node - mean_siblings) / (std_siblings + eps) (0 for an only child), applied to the token that chose it;
"joint" adds both losses. One on-policy update per sampled batch, so the PPO ratio is 1 and clipping never
acts; no KL term.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.models.semantic_ids import SemanticIds

PAD, BOS, FIRST_CODE = 0, 1, 2


class GeneratorConfig(FrozenModel):
    dim: int = Field(64, gt=0)
    heads: int = Field(2, gt=0)
    layers: int = Field(2, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_items: int = Field(20, gt=0, description="History items the generator reads.")


# -- token layout and trie -----------------------------------------------------------------------------------
class TokenLayout:
    """Global token ids: 0 pad, 1 BOS, then one vocabulary slice per level (K, K, K, dedup size)."""

    def __init__(self, ids: SemanticIds) -> None:
        self.depth = ids.codes.shape[1]
        self.sizes = [ids.codebook_size] * ids.levels + [ids.dedup_size]
        self.offsets = [FIRST_CODE + sum(self.sizes[:d]) for d in range(self.depth)]
        self.vocab = FIRST_CODE + sum(self.sizes)
        tokens = np.zeros((ids.num_items + 1, self.depth), dtype=np.int64)
        tokens[1:] = ids.codes + np.asarray(self.offsets)
        self.item_tokens = torch.from_numpy(tokens)  # [n + 1, depth]; row 0 = padding


class PrefixTrie:
    """Children of every prefix of the real items' codes, and the item at each full code."""

    def __init__(self, codes: np.ndarray) -> None:
        self.depth = codes.shape[1]
        self.children: dict[tuple[int, ...], np.ndarray] = {}
        self.items: dict[tuple[int, ...], int] = {}
        kids: dict[tuple[int, ...], set[int]] = {}
        for row, code in enumerate(map(tuple, codes.tolist())):
            if code in self.items:
                raise ValueError(f"item_idx {row + 1} shares its full code {code} with another item")
            self.items[code] = row + 1
            for d in range(self.depth):
                kids.setdefault(code[:d], set()).add(code[d])
        self.children = {p: np.asarray(sorted(c), dtype=np.int64) for p, c in kids.items()}

    def mask(self, prefixes: Sequence[tuple[int, ...]], size: int) -> torch.Tensor:
        """[R, size] True where code c continues prefix r to a real item."""
        out = torch.zeros(len(prefixes), size, dtype=torch.bool)
        for r, prefix in enumerate(prefixes):
            out[r, torch.from_numpy(self.children[prefix])] = True
        return out


# -- model ---------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        d = config.dim
        if d % config.heads:
            raise ValueError(f"dim {d} must be divisible by heads {config.heads}")
        self.heads = config.heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, T, D]; mask [B, 1, T, P + T] (True = attend); past keys/values [B, H, P, dh]."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, dh]
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        x = x + self.drop(self.ff(self.norm2(x)))
        return x, (k[:, :, -t:], v[:, :, -t:])


@dataclass
class HistoryCache:
    """Keys/values of encoded histories, their validity, the last hidden state and the next position."""

    past: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [U, H, T, dh]
    valid: torch.Tensor  # [U, T]
    last: torch.Tensor  # [U, D] hidden at the last history token (predicts level 1)
    next_pos: torch.Tensor  # [U]


class GenerativeRetriever(nn.Module):
    """Decoder-only transformer over semantic-ID tokens, with a value head (V-STAR)."""

    def __init__(self, layout: TokenLayout, config: GeneratorConfig) -> None:
        super().__init__()
        self.config, self.layout = config, layout
        self.register_buffer("item_tokens", layout.item_tokens.clone(), persistent=False)
        self.max_pos = 1 + layout.depth * (config.max_items + 1)
        self.tok = nn.Embedding(layout.vocab, config.dim, padding_idx=PAD)
        self.pos = nn.Embedding(self.max_pos, config.dim)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.value_head = nn.Sequential(
            nn.Linear(config.dim, config.dim), nn.ReLU(), nn.Linear(config.dim, 1)
        )
        self.drop = nn.Dropout(config.dropout)

    # tokens ------------------------------------------------------------------------------------------------
    def history_tokens(self, histories: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``BOS + tokens of the last max_items items`` [U, T] and each row's pad count [U]."""
        cut = [np.asarray(h[-self.config.max_items :], dtype=np.int64) for h in histories]
        width = 1 + self.layout.depth * max((len(h) for h in cut), default=0)
        out = torch.zeros(len(cut), width, dtype=torch.long)
        pads = torch.zeros(len(cut), dtype=torch.long)
        for r, h in enumerate(cut):
            seq = self.item_tokens[torch.from_numpy(h)].reshape(-1)
            n = 1 + len(seq)
            out[r, width - n] = BOS
            out[r, width - n + 1 :] = seq
            pads[r] = width - n
        return out.to(self.item_tokens.device), pads.to(self.item_tokens.device)

    def _run(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        x = self.drop(self.tok(tokens) + self.pos(pos.clamp(0, self.max_pos - 1)))
        kv = []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block(x, mask, past[i] if past is not None else None)
            kv.append(layer_kv)
        return self.norm(x), kv

    def forward(self, tokens: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
        """Hidden states [U, T, D] of left-padded token rows (causal; pads attend only to themselves)."""
        t = tokens.shape[1]
        ar = torch.arange(t, device=tokens.device)
        valid = ar.unsqueeze(0) >= pads.unsqueeze(1)  # [U, T]
        causal = ar.unsqueeze(1) >= ar.unsqueeze(0)  # [T, T]
        mask = (causal & valid.unsqueeze(1)) | torch.eye(t, dtype=torch.bool, device=tokens.device)
        hidden, _ = self._run(tokens, ar.unsqueeze(0) - pads.unsqueeze(1), mask.unsqueeze(1), None)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.tok.weight.T  # tied input/output embeddings

    def level_logits(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits over level ``depth``'s codes [..., size_depth]."""
        lo = self.layout.offsets[depth]
        return self.logits(hidden)[..., lo : lo + self.layout.sizes[depth]]

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        # Detached: the value head learns from rewards without moving the policy's representation.
        return self.value_head(hidden.detach()).squeeze(-1)

    # decoding --------------------------------------------------------------------------------------------
    def encode_history(self, histories: Sequence[np.ndarray]) -> HistoryCache:
        tokens, pads = self.history_tokens(histories)
        t = tokens.shape[1]
        ar = torch.arange(t, device=tokens.device)
        valid = ar.unsqueeze(0) >= pads.unsqueeze(1)
        causal = ar.unsqueeze(1) >= ar.unsqueeze(0)
        mask = (causal & valid.unsqueeze(1)) | torch.eye(t, dtype=torch.bool, device=tokens.device)
        hidden, kv = self._run(tokens, ar.unsqueeze(0) - pads.unsqueeze(1), mask.unsqueeze(1), None)
        return HistoryCache(kv, valid, hidden[:, -1], t - pads)

    def extend(self, cache: HistoryCache, rows: torch.Tensor, prefix_tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [R, d, D] of prefix tokens [R, d] appended to the histories of users ``rows``."""
        r, d = prefix_tokens.shape
        hist_valid = cache.valid[rows]  # [R, T]
        causal = torch.ones(d, d, dtype=torch.bool, device=rows.device).tril()
        mask = torch.cat([hist_valid.unsqueeze(1).expand(r, d, -1), causal.expand(r, d, d)], 2)
        past = [(k[rows], v[rows]) for k, v in cache.past]
        pos = cache.next_pos[rows].unsqueeze(1) + torch.arange(d, device=rows.device)
        hidden, _ = self._run(prefix_tokens, pos, mask.unsqueeze(1), past)
        return hidden


# -- node evaluation (one row = one model call) --------------------------------------------------------------
@dataclass
class NodeEval:
    logp: torch.Tensor  # [R, size] constrained log-probabilities over the next level's codes (-inf elsewhere)
    value: torch.Tensor  # [R]
    entropy: torch.Tensor  # [R]


class PolicyEvaluator:
    """Evaluates prefix nodes of one batch of users against their cached histories; counts model calls."""

    def __init__(self, model: GenerativeRetriever, trie: PrefixTrie, histories: Sequence[np.ndarray]) -> None:
        self.model, self.trie = model, trie
        self.cache = model.encode_history(histories)
        self.calls = np.zeros(len(histories), dtype=np.int64)
        self.device = model.item_tokens.device

    @torch.no_grad()
    def evaluate(self, users: Sequence[int], prefixes: Sequence[tuple[int, ...]]) -> NodeEval:
        """Nodes of equal depth; ``users`` are row indices into this batch's histories."""
        depth = len(prefixes[0])
        if any(len(p) != depth for p in prefixes):
            raise ValueError("evaluate: prefixes of one call must have the same depth")
        rows = torch.as_tensor(list(users), dtype=torch.long, device=self.device)
        if depth == 0:
            hidden = self.cache.last[rows]
        else:
            offsets = torch.as_tensor(self.model.layout.offsets[:depth], device=self.device)
            tokens = torch.as_tensor([list(p) for p in prefixes], device=self.device) + offsets
            hidden = self.model.extend(self.cache, rows, tokens)[:, -1]
        logits = self.model.level_logits(hidden, depth).float()
        mask = self.trie.mask(prefixes, logits.shape[1]).to(self.device)
        logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), -1)
        p = logp.exp()
        entropy = -(p * logp.masked_fill(~mask, 0.0)).sum(-1)
        np.add.at(self.calls, np.asarray(list(users), dtype=np.int64), 1)
        return NodeEval(logp.cpu(), self.model.value(hidden).float().cpu(), entropy.cpu())


@dataclass
class SearchResult:
    """Per user: candidate items ranked by sequence log-probability, and the model calls spent."""

    items: list[list[int]]
    scores: list[list[float]]
    calls: np.ndarray
    #: Per user, every evaluated node: prefix -> (log-prob of the prefix, V, H) ...
    nodes: list[dict[tuple[int, ...], tuple[float, float, float]]] = field(default_factory=list)
    #: ... and its children's log-probabilities.
    kids: list[dict[tuple[int, ...], dict[int, float]]] = field(default_factory=list)


def _children(ev: NodeEval, r: int) -> dict[int, float]:
    row = ev.logp[r]
    idx = torch.nonzero(torch.isfinite(row)).flatten().tolist()
    return {c: float(row[c]) for c in idx}


def beam_search(
    evaluator: PolicyEvaluator, width: int, exclude: Sequence[set[int]] | None = None
) -> SearchResult:
    """Constrained beam search of ``width`` for every user of the evaluator's batch."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    trie, n = evaluator.trie, len(evaluator.calls)
    beams: list[list[tuple[tuple[int, ...], float]]] = [[((), 0.0)] for _ in range(n)]
    nodes: list[dict[tuple[int, ...], tuple[float, float, float]]] = [{} for _ in range(n)]
    kids: list[dict[tuple[int, ...], dict[int, float]]] = [{} for _ in range(n)]
    leaves: list[dict[int, float]] = [{} for _ in range(n)]
    for depth in range(trie.depth):
        users = [u for u in range(n) for _ in beams[u]]
        prefixes = [p for u in range(n) for p, _ in beams[u]]
        if not prefixes:
            break
        ev = evaluator.evaluate(users, prefixes)
        grown: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in range(n)]
        r = 0
        for u in range(n):
            for prefix, score in beams[u]:
                nodes[u][prefix] = (score, float(ev.value[r]), float(ev.entropy[r]))
                kids[u][prefix] = _children(ev, r)
                grown[u] += [(prefix + (c,), score + lp) for c, lp in kids[u][prefix].items()]
                r += 1
        for u in range(n):
            if depth == trie.depth - 1:
                _add_leaves(leaves[u], trie, grown[u], exclude[u] if exclude is not None else None)
            else:
                beams[u] = sorted(grown[u], key=lambda x: -x[1])[:width]
    items, scores = _rank(leaves)
    return SearchResult(items, scores, evaluator.calls.copy(), nodes, kids)


def _add_leaves(
    leaves: dict[int, float],
    trie: PrefixTrie,
    grown: list[tuple[tuple[int, ...], float]],
    exclude: set[int] | None,
) -> None:
    for code, score in grown:
        item = trie.items[code]
        if exclude is None or item not in exclude:
            leaves[item] = score


def _rank(leaves: list[dict[int, float]]) -> tuple[list[list[int]], list[list[float]]]:
    ranked = [sorted(d.items(), key=lambda x: -x[1]) for d in leaves]
    return [[i for i, _ in r] for r in ranked], [[s for _, s in r] for r in ranked]


def value_guided_search(
    evaluator: PolicyEvaluator,
    beam: int,
    budget: int,
    lam: float = 0.1,
    exclude: Sequence[set[int]] | None = None,
) -> SearchResult:
    """V-STAR's value-guided decoding: a beam tree of width ``beam``, then ``budget`` more model calls spent
    branching the highest-G (V + lam * H) nodes and following each branch greedily to the leaves."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    base = beam_search(evaluator, beam, exclude)
    trie, n, last = evaluator.trie, len(evaluator.calls), evaluator.trie.depth - 1
    nodes, kids = base.nodes, base.kids
    leaves = [dict(zip(i, s, strict=True)) for i, s in zip(base.items, base.scores, strict=True)]
    spent = np.zeros(n, dtype=np.int64)
    pending: list[tuple[tuple[int, ...], float] | None] = [None] * n
    while True:
        active: list[int] = []
        for u in range(n):
            if spent[u] >= budget:
                continue
            if pending[u] is None:
                pending[u] = _pick_branch(nodes[u], kids[u], trie, lam)
            if pending[u] is not None:
                active.append(u)
        if not active:
            break
        by_depth: dict[int, list[int]] = {}
        for u in active:
            by_depth.setdefault(len(pending[u][0]), []).append(u)  # type: ignore[index]
        for depth_users in by_depth.values():
            ev = evaluator.evaluate(depth_users, [pending[u][0] for u in depth_users])  # type: ignore[index]
            for r, u in enumerate(depth_users):
                prefix, score = pending[u]  # type: ignore[misc]
                spent[u] += 1
                nodes[u][prefix] = (score, float(ev.value[r]), float(ev.entropy[r]))
                kids[u][prefix] = _children(ev, r)
                grown = [(prefix + (c,), score + lp) for c, lp in kids[u][prefix].items()]
                if len(prefix) == last:
                    _add_leaves(leaves[u], trie, grown, exclude[u] if exclude is not None else None)
                    pending[u] = None
                else:  # greedy descent: the most probable child is evaluated next
                    pending[u] = max(grown, key=lambda x: x[1])
    items, scores = _rank(leaves)
    return SearchResult(items, scores, evaluator.calls.copy(), nodes, kids)


def _pick_branch(
    nodes: dict[tuple[int, ...], tuple[float, float, float]],
    kids: dict[tuple[int, ...], dict[int, float]],
    trie: PrefixTrie,
    lam: float,
) -> tuple[tuple[int, ...], float] | None:
    """The most probable unexplored child of the highest-G (V + lam * H) evaluated inner node; None when
    every inner node's children were all explored."""
    best, best_g = None, -math.inf
    for prefix, (_, v, h) in nodes.items():
        if len(prefix) >= trie.depth - 1:
            continue  # children of the last level are leaves: already candidates
        if all(prefix + (c,) in nodes for c in kids[prefix]):
            continue
        g = v + lam * h
        if g > best_g:
            best, best_g = prefix, g
    if best is None:
        return None
    c, lp = max(((c, lp) for c, lp in kids[best].items() if best + (c,) not in nodes), key=lambda x: x[1])
    return best + (c,), nodes[best][0] + lp


def topk_sampling_search(
    evaluator: PolicyEvaluator,
    budget: int,
    top_k: int,
    generator: torch.Generator,
    exclude: Sequence[set[int]] | None = None,
    temperature: float = 1.0,
) -> SearchResult:
    """Top-K sampling at a fixed call budget: paths are drawn from the root, each level from the ``top_k``
    most probable trie children (renormalised, ``temperature``-scaled), without replacement: a child whose
    top-K subtree is fully evaluated is not drawn again, so every draw evaluates at least one new node (one
    call each) until ``budget`` calls are spent or the top-K tree is exhausted. Every leaf under an
    evaluated last-level node is a candidate, ranked by sequence log-probability as in beam search."""
    if budget < 1 or top_k < 1:
        raise ValueError(f"budget and top_k must be >= 1, got {budget} and {top_k}")
    trie, n, last = evaluator.trie, len(evaluator.calls), evaluator.trie.depth - 1
    nodes: list[dict[tuple[int, ...], tuple[float, float, float]]] = [{} for _ in range(n)]
    kids: list[dict[tuple[int, ...], dict[int, float]]] = [{} for _ in range(n)]
    leaves: list[dict[int, float]] = [{} for _ in range(n)]
    closed: list[set[tuple[int, ...]]] = [set() for _ in range(n)]  # fully evaluated top-K subtrees
    spent = np.zeros(n, dtype=np.int64)

    def top(u: int, prefix: tuple[int, ...]) -> list[tuple[int, float]]:
        return sorted(kids[u][prefix].items(), key=lambda x: -x[1])[:top_k]

    def close_upwards(u: int, prefix: tuple[int, ...]) -> None:
        closed[u].add(prefix)
        while prefix:
            prefix = prefix[:-1]
            if all(prefix + (c,) in closed[u] for c, _ in top(u, prefix)):
                closed[u].add(prefix)
            else:
                break

    while True:
        active = [u for u in range(n) if spent[u] < budget and () not in closed[u]]
        if not active:
            break
        paths: dict[int, tuple[tuple[int, ...], float]] = {u: ((), 0.0) for u in active}
        for depth in range(trie.depth):
            todo = [u for u in paths if paths[u][0] not in kids[u]]
            if todo:
                ev = evaluator.evaluate(todo, [paths[u][0] for u in todo])
                for r, u in enumerate(todo):
                    prefix, score = paths[u]
                    spent[u] += 1
                    nodes[u][prefix] = (score, float(ev.value[r]), float(ev.entropy[r]))
                    kids[u][prefix] = _children(ev, r)
                    if depth == last:
                        grown = [(prefix + (c,), score + lp) for c, lp in kids[u][prefix].items()]
                        _add_leaves(leaves[u], trie, grown, exclude[u] if exclude is not None else None)
                        close_upwards(u, prefix)
            if depth == last:
                break
            for u in list(paths):
                prefix, score = paths[u]
                options = [(c, lp) for c, lp in top(u, prefix) if prefix + (c,) not in closed[u]]
                if spent[u] >= budget or not options:  # budget spent (or nothing new below): the draw ends
                    del paths[u]
                    continue
                logits = torch.tensor([lp for _, lp in options]) / temperature
                pick = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=generator))
                paths[u] = (prefix + (options[pick][0],), score + options[pick][1])
    items, scores = _rank(leaves)
    return SearchResult(items, scores, evaluator.calls.copy(), nodes, kids)


# -- RL: sampling, GRPO and Sibling-GRPO advantages -------------------------------------------------------
@torch.no_grad()
def sample_candidates(
    evaluator: PolicyEvaluator, group: int, generator: torch.Generator, temperature: float = 1.0
) -> np.ndarray:
    """[U, group, depth] codes sampled from the constrained policy (temperature-scaled), per user."""
    n, depth = len(evaluator.calls), evaluator.trie.depth
    paths = np.zeros((n, group, depth), dtype=np.int64)
    users = [u for u in range(n) for _ in range(group)]
    for d in range(depth):
        prefixes = [tuple(int(x) for x in paths[u, g, :d]) for u in range(n) for g in range(group)]
        ev = evaluator.evaluate(users, prefixes)
        probs = torch.softmax(ev.logp / temperature, -1)
        picks = torch.multinomial(probs, 1, generator=generator).squeeze(1).numpy()
        paths[:, :, d] = picks.reshape(n, group)
    return paths


def grpo_advantages(rewards: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """[G] -> [G]: (R - mean) / (std + eps) over one user's group (population std)."""
    r = np.asarray(rewards, dtype=np.float64)
    return (r - r.mean()) / (r.std() + eps)


@dataclass(frozen=True)
class SiblingGroup:
    """The children of one parent prefix among a user's candidates, with each child node's mean reward."""

    parent: tuple[int, ...]
    children: tuple[int, ...]
    rewards: tuple[float, ...]


def sibling_groups(paths: np.ndarray, rewards: np.ndarray) -> list[SiblingGroup]:
    """Group one user's candidates [G, depth] by parent prefix at every depth; a child node's reward is the
    mean reward of the candidates passing through it. Groups are listed by depth, then parent, children
    sorted."""
    through: dict[tuple[int, ...], list[float]] = {}
    for path, r in zip(paths.tolist(), np.asarray(rewards, dtype=np.float64).tolist(), strict=True):
        for d in range(1, len(path) + 1):
            through.setdefault(tuple(path[:d]), []).append(r)
    parents: dict[tuple[int, ...], list[int]] = {}
    for node in through:
        parents.setdefault(node[:-1], []).append(node[-1])
    groups = []
    for parent in sorted(parents, key=lambda p: (len(p), p)):
        kids = sorted(parents[parent])
        groups.append(
            SiblingGroup(parent, tuple(kids), tuple(float(np.mean(through[parent + (c,)])) for c in kids))
        )
    return groups


def sibling_advantages(paths: np.ndarray, rewards: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """[G, depth]: the Sibling-GRPO advantage of the node each candidate's token d chose,
    (R_node - mean_siblings) / (std_siblings + eps); 0 where the node has no sibling."""
    adv: dict[tuple[int, ...], float] = {}
    for g in sibling_groups(paths, rewards):
        r = np.asarray(g.rewards)
        a = np.zeros_like(r) if len(r) < 2 else (r - r.mean()) / (r.std() + eps)
        for c, value in zip(g.children, a.tolist(), strict=True):
            adv[g.parent + (c,)] = value
    out = np.zeros(paths.shape, dtype=np.float64)
    for i, path in enumerate(paths.tolist()):
        for d in range(len(path)):
            out[i, d] = adv[tuple(path[: d + 1])]
    return out


RLMode = Literal["value", "grpo", "sibling", "joint"]


def path_outputs(
    model: GenerativeRetriever, trie: PrefixTrie, histories: Sequence[np.ndarray], paths: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """With gradients: constrained log-prob of every token [U, G, depth] and V at every prefix [U, G, depth]
    (depth 0 = the empty prefix) of candidate paths [U, G, depth]."""
    u, g, depth = paths.shape
    cache = model.encode_history(histories)
    device = model.item_tokens.device
    rows = torch.arange(u, device=device).repeat_interleave(g)
    offsets = torch.as_tensor(model.layout.offsets, device=device)
    tokens = torch.from_numpy(paths.reshape(u * g, depth)).to(device) + offsets
    prefix_hidden = model.extend(cache, rows, tokens[:, :-1]) if depth > 1 else None
    hiddens = [cache.last[rows]] + [prefix_hidden[:, d] for d in range(depth - 1)]  # type: ignore[index]
    logps, values = [], []
    flat = paths.reshape(u * g, depth)
    for d, hidden in enumerate(hiddens):
        logits = model.level_logits(hidden, d).float()
        prefixes = [tuple(int(x) for x in row[:d]) for row in flat]
        mask = trie.mask(prefixes, logits.shape[1]).to(device)
        logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), -1)
        logps.append(logp.gather(1, torch.from_numpy(flat[:, d : d + 1]).to(device)).squeeze(1))
        values.append(model.value(hidden).float())
    return torch.stack(logps, 1).view(u, g, depth), torch.stack(values, 1).view(u, g, depth)


def rl_loss(
    model: GenerativeRetriever,
    trie: PrefixTrie,
    histories: Sequence[np.ndarray],
    paths: np.ndarray,
    rewards: np.ndarray,
    mode: RLMode,
    gamma: float = 0.99,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss of ``mode`` (none for "value") + value-head MSE on gamma^(depth - d) * R, for paths
    [U, G, depth] with rewards [U, G]."""
    logp, values = path_outputs(model, trie, histories, paths)
    u, g, depth = paths.shape
    device = logp.device
    reward_t = torch.as_tensor(rewards, dtype=torch.float32, device=device)
    discount = torch.as_tensor([gamma ** (depth - d) for d in range(depth)], device=device)
    value_loss = ((values - reward_t.unsqueeze(-1) * discount) ** 2).mean()
    policy_loss = logp.new_zeros(())
    if mode in ("grpo", "joint"):
        adv = np.stack([grpo_advantages(r) for r in rewards])  # [U, G]
        a = torch.as_tensor(adv, dtype=torch.float32, device=device).unsqueeze(-1)
        policy_loss = policy_loss - (a * logp).mean()
    if mode in ("sibling", "joint"):
        adv = np.stack([sibling_advantages(p, r) for p, r in zip(paths, rewards, strict=True)])
        policy_loss = policy_loss - (torch.as_tensor(adv, dtype=torch.float32, device=device) * logp).mean()
    parts = {"policy_loss": float(policy_loss.detach()), "value_loss": float(value_loss.detach())}
    return policy_loss + value_loss, parts


# -- supervised training windows -----------------------------------------------------------------------------
def next_token_loss(model: GenerativeRetriever, windows: Sequence[np.ndarray]) -> torch.Tensor:
    """Cross-entropy of every next token (levels masked to their vocabulary slice) over item windows."""
    tokens, pads = model.history_tokens(windows)
    hidden = model(tokens[:, :-1], pads)  # [B, T-1, D]
    targets = tokens[:, 1:]
    logits = model.logits(hidden).float()
    vocab = logits.shape[-1]
    level = torch.full((vocab,), -1, dtype=torch.long, device=logits.device)
    for d, (lo, size) in enumerate(zip(model.layout.offsets, model.layout.sizes, strict=True)):
        level[lo : lo + size] = d
    target_level = level[targets]  # [B, T-1]; -1 for pads
    allowed = level.view(1, 1, vocab) == target_level.unsqueeze(-1)
    logits = logits.masked_fill(~allowed, float("-inf"))
    keep = target_level >= 0
    return F.cross_entropy(logits[keep], targets[keep])


RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


# -- the servable model: generator + its semantic IDs in one state dict ----------------------------------
class ServedGeneratorConfig(FrozenModel):
    """What rebuilds a servable generator: the code layout (the codes themselves are a weight) and the
    generator's own config; ``beam`` is the decoding width it is served with unless the service overrides."""

    num_items: int = Field(gt=0)
    codebook_size: int = Field(ge=2)
    levels: int = Field(ge=1)
    dedup_size: int = Field(ge=1)
    generator: GeneratorConfig = GeneratorConfig()
    beam: int = Field(20, ge=1, description="Beam width of constrained beam search when served.")


class ServedGenerator(nn.Module):
    """A ``GenerativeRetriever`` with its items' semantic IDs as a persistent buffer (``codes``), so that the
    registry's safetensors file alone rebuilds the token layout and the prefix trie."""

    def __init__(self, config: ServedGeneratorConfig) -> None:
        super().__init__()
        self.config = config
        codes = np.zeros((config.num_items, config.levels + 1), dtype=np.int64)
        # Initial codes of the right shape, a distinct code per item; the registered weights replace them.
        codes[:, -1] = np.arange(config.num_items) % config.dedup_size
        codes[:, 0] = (np.arange(config.num_items) // config.dedup_size) % config.codebook_size
        self.register_buffer("codes", torch.from_numpy(codes))
        self.generator = GenerativeRetriever(self._layout(), config.generator)
        self.trie: PrefixTrie | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.sync())

    @classmethod
    def wrap(cls, model: GenerativeRetriever, ids: SemanticIds, beam: int = 20) -> ServedGenerator:
        """A servable copy of a trained generator and the semantic IDs it was trained on."""
        config = ServedGeneratorConfig(
            num_items=ids.num_items,
            codebook_size=ids.codebook_size,
            levels=ids.levels,
            dedup_size=ids.dedup_size,
            generator=model.config,
            beam=beam,
        )
        served = cls(config)
        served.codes.copy_(torch.from_numpy(ids.codes))
        served.generator.load_state_dict(model.state_dict())
        served.sync()
        return served

    def _layout(self) -> TokenLayout:
        c = self.config
        return TokenLayout(SemanticIds(self.codes.cpu().numpy(), c.codebook_size, c.levels))

    def sync(self) -> None:
        """Rebuild the token table and the trie from ``codes`` (after loading weights)."""
        codes = self.codes.cpu().numpy()
        if int(codes[:, -1].max()) >= self.config.dedup_size or int(codes[:, :-1].max()) >= (
            self.config.codebook_size
        ):
            raise ValueError("codes: a code exceeds codebook_size / dedup_size of the config")
        layout = self._layout()
        self.generator.layout = layout
        self.generator.item_tokens = layout.item_tokens.to(self.codes.device)
        self.trie = PrefixTrie(codes)

    def evaluator(self, histories: Sequence[np.ndarray]) -> PolicyEvaluator:
        if self.trie is None:
            self.sync()
        assert self.trie is not None
        return PolicyEvaluator(self.generator, self.trie, histories)

    @torch.no_grad()
    def recommend(self, histories: Sequence[np.ndarray], beam: int | None = None) -> SearchResult:
        """Constrained beam search for each history (item_idx arrays, oldest first): real item_idx only."""
        return beam_search(self.evaluator(histories), beam or self.config.beam)

    @torch.no_grad()
    def sequence_logp(self, histories: Sequence[np.ndarray], items: np.ndarray) -> torch.Tensor:
        """[U, M] log-probability of generating each item_idx of ``items`` [U, M] (0 = padding: -inf)."""
        if self.trie is None:
            self.sync()
        assert self.trie is not None
        items = np.asarray(items, dtype=np.int64)
        codes = self.codes.cpu().numpy()
        safe = np.where(items > 0, items, 1)
        paths = codes[safe - 1]  # [U, M, depth]
        logp, _ = path_outputs(self.generator, self.trie, histories, paths)
        out = logp.sum(-1)
        return out.masked_fill(torch.from_numpy(items == 0).to(out.device), float("-inf"))
