"""Generative retrieval experiment: semantic IDs -> TIGER-style generator -> V-STAR (value-guided decoding,
GRPO / Sibling-GRPO) against SASRec, leave-one-out on one dataset.

Pipeline per seed: the leave-one-out split (``experiments.retrieval.prepare_split``) -> SASRec
(``training.retrieval.train_retrieval``) -> item vectors (attributes, SASRec item embedding or both) ->
semantic IDs (published as ``<ds>.semantic_ids``) -> supervised next-ID training of the generator with the
shared loop (``training.loop.fit``, early stopping on validation NDCG@10 of beam search) -> value head
trained on sampled candidates' rewards -> RL fine-tuning per mode -> test: beam search and value-guided
decoding and top-K sampling at equal model calls, ranks from the decoded list (an item not generated ranks
last), the decoding-budget curve (quality against model calls, the three decoders) as a table and an altair
chart, decoding cost (ms per user, calls) against beam width, paired tests against SASRec and HSTU.

Reward on MovieLens-100K (training users' last training item as the held-out next item, never a
validation/test target): R = 1[generated item = next item] + w * p, p = the SASRec percentile of the
generated item for that user (0 for items the user has seen). The hit term is the metric itself but is
sparse (a few per cent of samples hit); the SASRec term gives a graded signal from a model trained on the
same training part. On a synthetic dataset the reward is exact: the generator's true click probability
(``sigmoid`` of the true position-free click logit) of the produced item for that user, in the user's state
after the clicks of the RL context, at the time of the held-out next click.

Serving and A/B: ``--register`` registers the first seed's supervised generator and its RL-tuned copy as
``genret`` retrievers (``serving.registry``), which the service serves through constrained beam search and
``recsys ab run`` can compare as arms.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl
import torch
import typer
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel, PathsConfig, describe_config_error
from recsys.evaluation.retrieval import EvalCases, LeaveOneOutSplit, RetrievalEvaluation, metrics_from_ranks
from recsys.evaluation.significance import PairedTest, paired_t_over_seeds, paired_tests_over_users, summarize
from recsys.experiments.common import markdown_head, markdown_row, split_csv, write_report
from recsys.experiments.retrieval import RetrievalExperimentConfig, prepare_split
from recsys.models.generative_retrieval import (
    GenerativeRetriever,
    GeneratorConfig,
    PolicyEvaluator,
    PrefixTrie,
    RLMode,
    SearchResult,
    ServedGenerator,
    TokenLayout,
    beam_search,
    next_token_loss,
    rl_loss,
    sample_candidates,
    topk_sampling_search,
    value_guided_search,
)
from recsys.models.semantic_ids import (
    SemanticIdConfig,
    attribute_vectors,
    build_semantic_ids,
    combine_vectors,
    publish_semantic_ids,
)
from recsys.models.sequential import last_valid
from recsys.training.loop import LoopConfig, fit, record, seed_everything
from recsys.training.retrieval import RetrievalTrainConfig, train_retrieval
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import hardware_description

KS = (10, 50)
Decoder = Callable[[PolicyEvaluator, list[set[int]]], SearchResult]


def beam_calls(depth: int, width: int) -> int:
    """Model calls of constrained beam search of ``width`` over codes of ``depth`` tokens."""
    return 1 + (depth - 1) * width


class RLConfig(FrozenModel):
    steps: int = Field(40, ge=0, description="RL updates per mode (and for the value head alone).")
    users_per_step: int = Field(64, gt=0)
    group: int = Field(8, ge=2, description="Candidates sampled per user (the GRPO group).")
    lr: float = Field(1e-4, gt=0.0)
    dense_weight: float = Field(0.5, ge=0.0, description="w of the SASRec-percentile reward term.")
    gamma: float = Field(0.99, gt=0.0, le=1.0)
    modes: tuple[Literal["grpo", "sibling", "joint"], ...] = ("grpo", "sibling", "joint")


class GenRetConfig(FrozenModel):
    dataset: str = Field("ml100k", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    source_dir: Path | None = Field(None, description="MovieLens-100K folder.")
    events_path: Path | None = Field(None, description="A user's own events file instead (no attributes).")
    seeds: tuple[int, ...] = (0,)
    synthetic_preset: str | None = Field(
        None,
        description="Generate this synthetic preset (seed 0; cached by data version) and load it as the "
        "dataset: the RL reward is then the true click probability.",
    )
    vectors: Literal["attributes", "sasrec", "both"] = "both"
    semantic_ids: SemanticIdConfig = SemanticIdConfig()
    generator: GeneratorConfig = GeneratorConfig()
    batch_size: int = Field(64, gt=0)
    loop: LoopConfig = LoopConfig(max_epochs=10, patience=2, eval_every=2, progress=False)
    sasrec_loop: LoopConfig = LoopConfig(max_epochs=20, patience=2, eval_every=2, progress=False)
    sasrec_max_len: int = Field(200, gt=0)
    baselines: tuple[Literal["sasrec", "hstu"], ...] = Field(
        ("sasrec", "hstu"), description="Retrieval baselines (SASRec always: its embedding and reward)."
    )
    rl: RLConfig = RLConfig()
    beam: int = Field(10, ge=1, description="Beam width of the main table.")
    curve_beams: tuple[int, ...] = (4, 10)
    top_k: int = Field(5, ge=1, description="K of the top-K sampling decoder.")
    cost_beams: tuple[int, ...] = Field((1, 5, 10, 20, 50), description="Beam widths of the cost table.")
    cost_users: int = Field(200, gt=0, description="Test users the cost table decodes (timed).")
    register_models: bool = Field(False, description="Register the first seed's generators for serving.")
    lam: float = Field(0.1, ge=0.0, description="lambda of G = V + lambda * H.")
    eval_batch_size: int = Field(128, gt=0)
    valid_users: int | None = Field(
        300,
        gt=0,
        description="Validate on the first this many validation users (None = all): decoding "
        "every user each epoch costs more than the epoch itself on a CPU.",
    )


# -- evaluation ---------------------------------------------------------------------------------------------
def decoded_ranks(
    model: GenerativeRetriever, trie: PrefixTrie, cases: EvalCases, decoder: Decoder, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of each target in the decoded list (num_items when not generated), and calls per case."""
    was = model.training
    model.eval()
    ranks = np.zeros(len(cases), dtype=np.int64)
    calls = np.zeros(len(cases), dtype=np.int64)
    n_items = len(trie.items)
    try:
        for start in range(0, len(cases), batch_size):
            idx = range(start, min(start + batch_size, len(cases)))
            histories = [cases.histories[i] for i in idx]
            evaluator = PolicyEvaluator(model, trie, histories)
            result = decoder(evaluator, [set(h.tolist()) for h in histories])
            for r, i in enumerate(idx):
                target = int(cases.targets[i])
                items = result.items[r]
                ranks[i] = items.index(target) + 1 if target in items else n_items
                calls[i] = result.calls[r]
    finally:
        model.train(was)
    return ranks, calls


def evaluate_decoder(
    model: GenerativeRetriever, trie: PrefixTrie, cases: EvalCases, decoder: Decoder, batch_size: int
) -> tuple[RetrievalEvaluation, float]:
    evaluation, calls, _ = timed_evaluation(model, trie, cases, decoder, batch_size)
    return evaluation, calls


def timed_evaluation(
    model: GenerativeRetriever, trie: PrefixTrie, cases: EvalCases, decoder: Decoder, batch_size: int
) -> tuple[RetrievalEvaluation, float, float]:
    """The evaluation, mean model calls per case and decoding wall time in ms per case."""
    started = time.perf_counter()
    ranks, calls = decoded_ranks(model, trie, cases, decoder, batch_size)
    ms = 1000.0 * (time.perf_counter() - started) / max(len(cases), 1)
    metrics = metrics_from_ranks(ranks, KS)
    return RetrievalEvaluation(metrics, cases.users.copy(), ranks, None, KS), float(calls.mean()), ms


def beam_decoder(width: int) -> Decoder:
    return lambda ev, exclude: beam_search(ev, width, exclude)


def ved_decoder(beam: int, budget: int, lam: float) -> Decoder:
    return lambda ev, exclude: value_guided_search(ev, beam, budget, lam, exclude)


def topk_decoder(budget: int, top_k: int, seed: int) -> Decoder:
    """Top-K sampling with ``budget`` calls per user; one seeded torch generator over the whole evaluation."""
    generator = torch.Generator().manual_seed(seed)
    return lambda ev, exclude: topk_sampling_search(ev, budget, top_k, generator, exclude)


def head(cases: EvalCases, n: int) -> EvalCases:
    """The first ``n`` cases."""
    n = min(n, len(cases))
    return EvalCases(
        cases.users[:n], cases.histories[:n], cases.history_ts[:n], cases.targets[:n], cases.target_ts[:n]
    )


# -- supervised task for the shared loop ---------------------------------------------------------------------
class GeneratorTask:
    """``training.loop.TrainTask``: next-token loss over random windows of each user's training part."""

    def __init__(
        self,
        model: GenerativeRetriever,
        trie: PrefixTrie,
        split: LeaveOneOutSplit,
        batch_size: int,
        beam: int,
        eval_batch_size: int,
        valid_users: int | None = None,
    ) -> None:
        self.model, self.trie, self.split = model, trie, split
        self.valid = split.valid if valid_users is None else head(split.valid, valid_users)
        self.batch_size, self.beam, self.eval_batch_size = batch_size, beam, eval_batch_size
        self.sequences = [s for s in split.train_items if len(s) >= 1]
        if not self.sequences:
            raise ValueError("no user has a training interaction: nothing to train on")

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[list[np.ndarray]]:
        width = self.model.config.max_items + 1
        order = rng.permutation(len(self.sequences))
        for start in range(0, len(order), self.batch_size):
            batch = []
            for i in order[start : start + self.batch_size]:
                s = self.sequences[i]
                # A random window end (never shorter than the window) augments the data the last window sees.
                end = int(rng.integers(min(len(s), width), len(s) + 1))
                batch.append(s[max(0, end - width) : end])
            yield batch

    def loss(self, model: nn.Module, batch: list[np.ndarray], device: torch.device) -> torch.Tensor:
        assert isinstance(model, GenerativeRetriever)
        return next_token_loss(model, batch)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        assert isinstance(model, GenerativeRetriever)
        evaluation, _ = evaluate_decoder(
            model, self.trie, self.valid, beam_decoder(self.beam), self.eval_batch_size
        )
        return evaluation.metrics

    def flop_probe(self, model: nn.Module, device: torch.device) -> tuple[Callable[[], Any], int]:
        assert isinstance(model, GenerativeRetriever)
        batch = self.sequences[: self.batch_size]
        return (lambda: next_token_loss(model, batch)), len(batch)


# -- rewards and RL ------------------------------------------------------------------------------------------
@dataclass
class RLData:
    histories: list[np.ndarray]  # each training user's training part minus its last item
    targets: np.ndarray  # that last item
    dense: np.ndarray  # [U, num_items + 1] SASRec percentile of each item for the user (0 for seen items)

    def rewards(self, rows: np.ndarray, items: np.ndarray, dense_weight: float) -> np.ndarray:
        """rows [U], items [U, G] -> rewards [U, G]."""
        hit = (items == self.targets[rows][:, None]).astype(np.float64)
        return hit + dense_weight * self.dense[rows[:, None], items]


def synthetic_config(wh: Warehouse, dataset: str, paths: PathsConfig) -> Any:
    """The ``SyntheticConfig`` that generated ``<dataset>.events``: its manifest in ``paths``' cache (where
    ``load_synthetic`` generates), else what ``simulation.response.true_response_for`` finds."""
    from recsys.simulation.response import true_response_for
    from recsys.synthetic.generator import read_manifest

    latest = wh.latest(f"{dataset}.events")
    recorded = latest.inputs.get("synthetic_config") if latest is not None else None
    if recorded is None:
        raise ValueError(f"{dataset}.events was not generated by synthetic/ (no synthetic_config input)")
    try:
        return read_manifest(paths.cache / "synthetic" / recorded).config
    except FileNotFoundError:
        return true_response_for(wh, dataset).config


class TrueClickData:
    """RL contexts of a synthetic dataset with the exact reward: the world's true click probability of an
    item for the user, in the state after the context's clicks, at the time of the held-out next click."""

    def __init__(self, paths: PathsConfig, dataset: str, split: LeaveOneOutSplit) -> None:
        from recsys.simulation.response import TrueResponse

        keep = [i for i, s in enumerate(split.train_items) if len(s) >= 2]
        self.histories = [split.train_items[i][:-1] for i in keep]
        self.targets = np.asarray([split.train_items[i][-1] for i in keep], dtype=np.int64)
        self.ts = np.asarray([split.train_ts[i][-1] for i in keep], dtype=np.int64)
        with Warehouse(paths.warehouse, read_only=True) as wh:
            config = synthetic_config(wh, dataset, paths)
            item_ids = wh.sql(f"SELECT item_id FROM {dataset}.item_index ORDER BY item_idx")["item_id"]
            users = wh.sql(f"SELECT user_id, user_idx FROM {dataset}.user_index ORDER BY user_idx")
        self.item_ids = np.concatenate([[0], item_ids.to_numpy().astype(np.int64)])  # item_idx -> item_id
        user_of = dict(zip(users["user_idx"].to_list(), users["user_id"].to_list(), strict=True))
        self.users = np.asarray([user_of[int(split.train_users[i])] for i in keep], dtype=np.int64)
        context = pl.DataFrame(
            {
                "user_id": np.repeat(self.users, [len(h) for h in self.histories]),
                "item_id": self.item_ids[np.concatenate(self.histories)],
                "ts": np.concatenate([split.train_ts[i][:-1] for i in keep]),
            }
        )
        self.world = TrueResponse(config, self.users, context, start_ts=int(self.ts.max()) + 1)

    def rewards(self, rows: np.ndarray, items: np.ndarray, dense_weight: float) -> np.ndarray:
        """rows [U], items (item_idx) [U, G] -> P(click) [U, G] (``dense_weight`` does not apply)."""
        logits = self.world.click_logits(self.users[rows], self.item_ids[items], self.ts[rows])
        return 1.0 / (1.0 + np.exp(-logits))


@torch.no_grad()
def sasrec_percentiles(sasrec: nn.Module, split: LeaveOneOutSplit, max_len: int) -> RLData:
    """RL contexts of every training user with >= 2 training items and SASRec percentiles for them."""
    keep = [i for i, s in enumerate(split.train_items) if len(s) >= 2]
    histories = [split.train_items[i][:-1] for i in keep]
    cases = EvalCases(
        split.train_users[keep],
        histories,
        [split.train_ts[i][:-1] for i in keep],
        np.asarray([split.train_items[i][-1] for i in keep], dtype=np.int64),
        np.asarray([split.train_ts[i][-1] for i in keep], dtype=np.int64),
    )
    sasrec.eval()
    dense = np.zeros((len(keep), split.num_items + 1), dtype=np.float32)
    device = next(sasrec.parameters()).device
    for start in range(0, len(keep), 256):
        index = np.arange(start, min(start + 256, len(keep)))
        b = cases.batch(index, max_len).to(device)
        users = sasrec(b.items, b.ts, b.query_ts, b.lengths)
        scores = (last_valid(users, b.lengths) @ sasrec.item_vectors().T).float().cpu().numpy()
        scores[:, 0] = -np.inf
        order = scores.argsort(1).argsort(1)  # 0 = lowest
        dense[index] = order / split.num_items
    for r, h in enumerate(histories):
        dense[r, h] = 0.0
    dense[:, 0] = 0.0
    return RLData(histories, cases.targets, dense)


def rl_finetune(
    model: GenerativeRetriever,
    trie: PrefixTrie,
    data: RLData | TrueClickData,
    mode: RLMode,
    config: RLConfig,
    seed: int,
) -> list[dict[str, float]]:
    """RL updates of ``mode`` ("value" trains only the value head); per step: mean reward and losses."""
    params = model.value_head.parameters() if mode == "value" else model.parameters()
    optimizer = torch.optim.Adam(params, lr=config.lr if mode != "value" else 1e-3)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    log = []
    for _ in range(config.steps):
        rows = rng.choice(
            len(data.histories), size=min(config.users_per_step, len(data.histories)), replace=False
        )
        histories = [data.histories[i] for i in rows]
        model.eval()  # sampling without dropout
        paths = sample_candidates(PolicyEvaluator(model, trie, histories), config.group, generator)
        items = np.vectorize(lambda *c: trie.items[c])(*np.moveaxis(paths, -1, 0))
        rewards = data.rewards(rows, items, config.dense_weight)
        model.train()
        loss, parts = rl_loss(model, trie, histories, paths, rewards, mode, config.gamma)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.append({"reward": float(rewards.mean()), **parts})
    model.eval()
    return log


# -- the experiment ------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    evaluation: RetrievalEvaluation
    calls: float
    ms_per_user: float = 0.0


@dataclass(frozen=True)
class CurvePoint:
    decoder: str  # beam, VED or top-K
    beam: int  # the beam width whose call count the point matches
    calls: float
    hr10: float
    ndcg10: float


@dataclass(frozen=True)
class CostPoint:
    beam: int
    calls: float
    ms_per_user: float
    ndcg10: float


@dataclass
class SeedResult:
    seed: int
    baselines: dict[str, RetrievalEvaluation]
    variants: dict[str, Variant]
    curve: list[CurvePoint]
    cost: list[CostPoint]
    rl_logs: dict[str, list[dict[str, float]]]
    ids_summary: dict[str, float]
    train_time_s: float
    best_epoch: int
    epochs_run: int
    registered: dict[str, str] = field(default_factory=dict)

    @property
    def sasrec(self) -> RetrievalEvaluation:
        return self.baselines["sasrec"]


@dataclass
class GenRetResult:
    config: GenRetConfig
    num_items: int
    num_test: int
    seeds: list[SeedResult]
    tests: list[PairedTest] = field(default_factory=list)
    hardware: str = ""
    report_path: Path | None = None
    chart_path: Path | None = None
    reward: str = ""


def item_vectors(
    wh_path: Path, config: GenRetConfig, num_items: int, sasrec: nn.Module
) -> tuple[np.ndarray, str]:
    parts = []
    if config.vectors in ("attributes", "both"):
        with Warehouse(wh_path, read_only=True) as wh:
            parts.append(attribute_vectors(wh, config.dataset, num_items))
    if config.vectors in ("sasrec", "both"):
        parts.append(sasrec.item_vectors()[1:].detach().float().cpu().numpy())
    return combine_vectors(*parts), config.vectors


def is_synthetic(wh_path: Path, dataset: str) -> bool:
    with Warehouse(wh_path, read_only=True) as wh:
        latest = wh.latest(f"{dataset}.events")
    return latest is not None and "synthetic_config" in latest.inputs


def run_seed(
    config: GenRetConfig, split: LeaveOneOutSplit, data_version: str, paths: PathsConfig, seed: int, say: Any
) -> SeedResult:
    baselines: dict[str, RetrievalEvaluation] = {}
    sasrec: nn.Module | None = None
    for name in dict.fromkeys(("sasrec", *config.baselines)):
        run = train_retrieval(
            name,
            split,
            seed=seed,
            train_config=RetrievalTrainConfig(max_len=config.sasrec_max_len, ks=KS),
            loop_config=config.sasrec_loop,
            dataset=config.dataset,
            data_version=data_version,
        )
        assert run.test is not None and run.model is not None
        baselines[name] = run.test
        if name == "sasrec":
            sasrec = run.model
        say(f"seed {seed}: {name} test ndcg@10 {run.test.metrics['ndcg@10']:.4f}")
    assert sasrec is not None

    vectors, source = item_vectors(paths.warehouse, config, split.num_items, sasrec)
    sid_config = SemanticIdConfig(**{**config.semantic_ids.model_dump(), "seed": seed})
    ids = build_semantic_ids(vectors, sid_config)
    with Warehouse(paths.warehouse) as wh:
        record(
            publish_semantic_ids,
            wh,
            config.dataset,
            ids,
            sid_config,
            inputs={"sequences": data_version},
            source=source,
        )
    say(f"seed {seed}: semantic ids {ids.summary()}")

    seed_everything(seed)
    layout, trie = TokenLayout(ids), PrefixTrie(ids.codes)
    model = GenerativeRetriever(layout, config.generator)
    task = GeneratorTask(
        model, trie, split, config.batch_size, config.beam, config.eval_batch_size, config.valid_users
    )
    loop = LoopConfig(**{**config.loop.model_dump(), "seed": seed})
    fitted = fit(task, loop, run_kind="genret", run_name="generator")
    model.eval()
    say(
        f"seed {seed}: generator best valid {fitted.best_valid} "
        f"(epoch {fitted.best_epoch}/{fitted.epochs_run})"
    )

    data: RLData | TrueClickData = (
        TrueClickData(paths, config.dataset, split)
        if is_synthetic(paths.warehouse, config.dataset)
        else sasrec_percentiles(sasrec, split, config.sasrec_max_len)
    )
    rl_logs = {"value": rl_finetune(model, trie, data, "value", config.rl, seed)}
    test, bs, depth = split.test, config.eval_batch_size, ids.codes.shape[1]
    half = max(1, config.beam // 2)
    full_calls = beam_calls(depth, config.beam)
    ved_budget = full_calls - beam_calls(depth, half)
    variants: dict[str, Variant] = {}

    def add(name: str, m: GenerativeRetriever, decoder: Decoder) -> Variant:
        evaluation, calls, ms = timed_evaluation(m, trie, test, decoder, bs)
        variants[name] = Variant(name, evaluation, calls, ms)
        say(
            f"seed {seed}: {name} ndcg@10 {evaluation.metrics['ndcg@10']:.4f} "
            f"calls {calls:.1f} {ms:.1f} ms/user"
        )
        return variants[name]

    main = {
        "beam": add(f"GR beam {config.beam}", model, beam_decoder(config.beam)),
        "VED": add(f"GR VED {half}+{ved_budget}", model, ved_decoder(half, ved_budget, config.lam)),
        "top-K": add(f"GR top-{config.top_k} sampling", model, topk_decoder(full_calls, config.top_k, seed)),
    }
    curve = []
    for b in config.curve_beams:
        h = max(1, b // 2)
        budget = beam_calls(depth, b) - beam_calls(depth, h)
        decoders = {
            "beam": beam_decoder(b),
            "VED": ved_decoder(h, budget, config.lam),
            "top-K": topk_decoder(beam_calls(depth, b), config.top_k, seed),
        }
        for name, decoder in decoders.items():
            if b == config.beam:  # the main table's runs: not decoded twice
                v = main[name]
                evaluation, calls = v.evaluation, v.calls
            else:
                evaluation, calls = evaluate_decoder(model, trie, test, decoder, bs)
            m = evaluation.metrics
            curve.append(CurvePoint(name, b, calls, m["hr@10"], m["ndcg@10"]))
    cost = []
    cost_cases = head(test, config.cost_users)
    for b in config.cost_beams:
        evaluation, calls, ms = timed_evaluation(model, trie, cost_cases, beam_decoder(b), bs)
        cost.append(CostPoint(b, calls, ms, evaluation.metrics["ndcg@10"]))
        say(f"seed {seed}: cost beam {b}: {calls:.1f} calls, {ms:.2f} ms/user")
    tuned_models: dict[str, GenerativeRetriever] = {}
    for mode in config.rl.modes:
        tuned = copy.deepcopy(model)
        rl_logs[mode] = rl_finetune(tuned, trie, data, mode, config.rl, seed)
        add(f"GR+{mode} beam {config.beam}", tuned, beam_decoder(config.beam))
        add(f"GR+{mode} VED {half}+{ved_budget}", tuned, ved_decoder(half, ved_budget, config.lam))
        tuned_models[mode] = tuned
    registered: dict[str, str] = {}
    if config.register_models and seed == config.seeds[0]:
        registered = register_generators(config, paths, ids, model, tuned_models, variants)
        say(f"seed {seed}: registered {registered}")
    return SeedResult(
        seed,
        baselines,
        variants,
        curve,
        cost,
        rl_logs,
        ids.summary(),
        fitted.train_time_s,
        fitted.best_epoch,
        fitted.epochs_run,
        registered,
    )


def register_generators(
    config: GenRetConfig,
    paths: PathsConfig,
    ids: Any,
    model: GenerativeRetriever,
    tuned: dict[str, GenerativeRetriever],
    variants: dict[str, Variant],
) -> dict[str, str]:
    """Register the supervised generator as ``<ds>-genret-supervised`` and each RL-tuned one as
    ``<ds>-genret-<mode>`` (``genret`` retrievers, served by beam search of ``config.beam``)."""
    from recsys.serving.registry import catalog_from_warehouse, histories_from_warehouse, register_model

    with Warehouse(paths.warehouse, read_only=True) as wh:
        items = catalog_from_warehouse(wh, config.dataset)
        histories = histories_from_warehouse(wh, config.dataset)
        data_version = build_version(wh, config.dataset)
    prefix = config.dataset.lower().replace("_", "-")
    out = {}
    for label, m in {"supervised": model, **tuned}.items():
        name = f"GR beam {config.beam}" if label == "supervised" else f"GR+{label} beam {config.beam}"
        metrics = {f"test_{k}": v for k, v in variants[name].evaluation.metrics.items()}
        out[label] = register_model(
            f"{prefix}-genret-{label}",
            architecture="genret",
            task="retrieval",
            model=ServedGenerator.wrap(m, ids, beam=config.beam).eval(),
            items=items,
            data_version=data_version,
            metrics=metrics,
            histories=histories,
        )
    return out


def build_version(wh: Warehouse, dataset: str) -> str:
    latest = wh.latest(f"{dataset}.sequences")
    if latest is None:
        raise ValueError(f"{dataset}.sequences is not built")
    return latest.version


def load_synthetic(paths: PathsConfig, dataset: str, preset: str) -> str:
    """Generate ``preset`` (seed 0) into the cache folder named by its data version (reused when complete)
    and publish it as ``dataset``; returns the data version."""
    from recsys.synthetic.config import SyntheticConfig
    from recsys.synthetic.generator import generate, read_manifest
    from recsys.synthetic.warehouse_load import load_into_warehouse

    config = SyntheticConfig.preset(preset, 0)
    out = paths.cache / "synthetic" / config.data_version()
    try:
        fresh = read_manifest(out).data_version == config.data_version()
    except FileNotFoundError:
        fresh = False
    if not fresh:
        generate(config, out)
    with Warehouse(paths.warehouse) as wh:
        load_into_warehouse(wh, out, dataset)
    return config.data_version()


def run_genret_experiment(
    config: GenRetConfig, paths: PathsConfig | None = None, *, echo: Any = None
) -> GenRetResult:
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    if config.synthetic_preset is not None:
        version = load_synthetic(paths, config.dataset, config.synthetic_preset)
        say(f"{config.dataset}: synthetic preset {config.synthetic_preset!r} (data version {version})")
    split, data_version = record(
        prepare_split,
        paths.warehouse,
        RetrievalExperimentConfig(
            dataset=config.dataset,
            source_dir=config.source_dir,
            events_path=config.events_path,
            models=("sasrec",),
            comparisons=(),
        ),
    )
    say(f"{config.dataset}: {split.num_items} items, {len(split.test)} test users")
    synthetic = is_synthetic(paths.warehouse, config.dataset)
    seeds = [run_seed(config, split, data_version, paths, s, say) for s in config.seeds]
    result = GenRetResult(
        config,
        split.num_items,
        len(split.test),
        seeds,
        paired_tests(seeds),
        hardware_description(),
        reward="true click probability (synthetic world)"
        if synthetic
        else f"1[held-out next item] + {config.rl.dense_weight} x SASRec percentile",
    )
    reports = paths.home / "reports"
    result.chart_path = write_report(reports / f"genret_{config.dataset}_budget.html", budget_chart(result))
    result.report_path = write_report(reports / f"genret_{config.dataset}.md", format_report(result))
    return result


def paired_tests(seeds: list[SeedResult]) -> list[PairedTest]:
    """The supervised generator's decoders and the RL-tuned beam search against every baseline on NDCG@10:
    over users (first seed) and over seeds (with more than one)."""
    tests: list[PairedTest] = []
    first = seeds[0]
    for name, v in first.variants.items():
        for base in first.baselines:
            tests += paired_tests_over_users(
                v.evaluation.per_user("ndcg@10"),
                first.baselines[base].per_user("ndcg@10"),
                metric="ndcg@10",
                a_name=name,
                b_name=base,
            )
            if len(seeds) > 1:
                tests.append(
                    paired_t_over_seeds(
                        [s.variants[name].evaluation.metrics["ndcg@10"] for s in seeds],
                        [s.baselines[base].metrics["ndcg@10"] for s in seeds],
                        metric="ndcg@10",
                        a_name=name,
                        b_name=base,
                    )
                )
    if len(seeds) > 1:  # the decoders against each other at equal calls, and RL against supervised
        names = list(first.variants)
        for a in names[1:]:
            tests.append(
                paired_t_over_seeds(
                    [s.variants[a].evaluation.metrics["ndcg@10"] for s in seeds],
                    [s.variants[names[0]].evaluation.metrics["ndcg@10"] for s in seeds],
                    metric="ndcg@10",
                    a_name=a,
                    b_name=names[0],
                )
            )
    return tests


def budget_chart(result: GenRetResult) -> str:
    """An altair line chart (HTML) of NDCG@10 against model calls per user, one line per decoder, seed 0."""
    import altair as alt

    values = [
        {
            "decoder": p.decoder,
            "calls per user": p.calls,
            "NDCG@10": p.ndcg10,
            "HR@10": p.hr10,
            "beam": p.beam,
        }
        for p in result.seeds[0].curve
    ]
    chart = (
        alt.Chart(alt.Data(values=values))
        .mark_line(point=True)
        .encode(
            x=alt.X("calls per user:Q", title="model calls per user"),
            y=alt.Y("NDCG@10:Q"),
            color=alt.Color("decoder:N"),
            tooltip=["decoder:N", "beam:Q", "calls per user:Q", "NDCG@10:Q", "HR@10:Q"],
        )
        .properties(
            title=f"Decoding budget on {result.config.dataset} (seed {result.seeds[0].seed})",
            width=480,
            height=300,
        )
    )
    return chart.to_html()


def _mean_std(values: list[float]) -> str:
    return summarize(values).format()


def format_report(result: GenRetResult) -> str:
    c = result.config
    lines = [
        f"# Generative retrieval: {c.dataset}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {result.hardware}; "
        f"{result.num_items} items, {result.num_test} test users; seeds {list(c.seeds)}; item vectors "
        f"{c.vectors}; semantic ids {c.semantic_ids.method} K={c.semantic_ids.codebook_size} x "
        f"{c.semantic_ids.levels} + dedup; RL reward: {result.reward}.",
        "",
        "Leave-one-out, full ranking from the decoded list (history items excluded; an item not generated "
        "ranks last). Calls = policy evaluations at prefix nodes per user; ms = decoding wall time per user "
        f"(batches of {c.eval_batch_size}).",
        "",
    ]
    metrics = ["hr@10", "ndcg@10", "hr@50", "ndcg@50"]
    lines += markdown_head(["Model", "HR@10", "NDCG@10", "HR@50", "NDCG@50", "Calls/user", "ms/user"])
    for base in result.seeds[0].baselines:
        row = [base] + [_mean_std([s.baselines[base].metrics[m] for s in result.seeds]) for m in metrics]
        lines.append(markdown_row([*row, "full scoring", "-"]))
    for name in result.seeds[0].variants:
        vs = [s.variants[name] for s in result.seeds]
        row = [name] + [_mean_std([v.evaluation.metrics[m] for v in vs]) for m in metrics]
        lines.append(
            markdown_row(
                [*row, f"{np.mean([v.calls for v in vs]):.1f}", f"{np.mean([v.ms_per_user for v in vs]):.1f}"]
            )
        )
    lines += [
        "",
        "## Decoding budget (supervised generator + value head; seed " + str(c.seeds[0]) + ")",
        "",
        f"VED at beam B: a beam of B/2, the rest of beam B's calls as expansion budget; top-{c.top_k} "
        "sampling: beam B's calls spent on sampled paths. Chart: "
        f"`genret_{c.dataset}_budget.html`.",
        "",
    ]
    lines += markdown_head(["Decoder", "Beam (call budget of)", "Calls/user", "HR@10", "NDCG@10"])
    for p in result.seeds[0].curve:
        lines.append(
            markdown_row([p.decoder, str(p.beam), f"{p.calls:.1f}", f"{p.hr10:.4f}", f"{p.ndcg10:.4f}"])
        )
    lines += [
        "",
        f"## Decoding cost against beam width (beam search, first {c.cost_users} test users, seed "
        f"{c.seeds[0]})",
        "",
    ]
    lines += markdown_head(["Beam", "Calls/user", "ms/user", "NDCG@10 (these users)"])
    for q in result.seeds[0].cost:
        lines.append(markdown_row([str(q.beam), f"{q.calls:.1f}", f"{q.ms_per_user:.2f}", f"{q.ndcg10:.4f}"]))
    lines += ["", "## Semantic IDs", ""]
    for s in result.seeds:
        lines.append(f"- seed {s.seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in s.ids_summary.items()))
    lines += ["", "## RL (mean reward of sampled candidates: first 10 steps -> last 10 steps)", ""]
    for s in result.seeds:
        for mode, log in s.rl_logs.items():
            if log:
                a = np.mean([x["reward"] for x in log[:10]])
                b = np.mean([x["reward"] for x in log[-10:]])
                lines.append(f"- seed {s.seed} {mode}: {a:.4f} -> {b:.4f}")
    registered = result.seeds[0].registered
    if registered:
        lines += ["", "## Registered (first seed)", ""]
        lines += [f"- {label}: `{tag}`" for label, tag in registered.items()]
    lines += ["", "## Significance", ""]
    lines += [f"- {t.format()}" for t in result.tests]
    return "\n".join(lines) + "\n"


app = typer.Typer(help="Generative retrieval with semantic IDs and V-STAR.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Generative retrieval with semantic IDs and V-STAR."""


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in split_csv(text))


@app.command("run")
def run_command(
    dataset: Annotated[str, typer.Option(help="Warehouse schema name.")] = "ml100k",
    source_dir: Annotated[Path | None, typer.Option(help="Unzipped MovieLens-100K folder.")] = None,
    synthetic_preset: Annotated[
        str | None, typer.Option(help="Generate this synthetic preset and load it as --dataset.")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Number of seeds (0..n-1).")] = 1,
    vectors: Annotated[str, typer.Option(help="attributes, sasrec or both.")] = "both",
    method: Annotated[str, typer.Option(help="rq-kmeans or rq-vae.")] = "rq-kmeans",
    codebook_size: Annotated[int, typer.Option(min=2)] = 32,
    max_epochs: Annotated[int, typer.Option(min=1)] = 10,
    patience: Annotated[
        int, typer.Option(min=1, help="Validations without improvement before stopping (every 2 epochs).")
    ] = 2,
    sasrec_epochs: Annotated[int, typer.Option(min=1, help="Epoch cap of SASRec and HSTU.")] = 20,
    baselines: Annotated[str, typer.Option(help="Comma-separated: sasrec, hstu.")] = "sasrec,hstu",
    baseline_max_len: Annotated[int, typer.Option(min=1, help="History length of SASRec and HSTU.")] = 200,
    rl_steps: Annotated[int, typer.Option(min=0)] = 40,
    beam: Annotated[int, typer.Option(min=1)] = 10,
    curve_beams: Annotated[
        str, typer.Option(help="Comma-separated beam widths of the budget curve.")
    ] = "4,10",
    top_k: Annotated[int, typer.Option(min=1, help="K of the top-K sampling decoder.")] = 5,
    cost_beams: Annotated[
        str, typer.Option(help="Comma-separated beam widths of the cost table.")
    ] = "1,5,10,20,50",
    cost_users: Annotated[int, typer.Option(min=1, help="Test users the cost table decodes.")] = 200,
    max_items: Annotated[int, typer.Option(min=1, help="History items the generator reads.")] = 20,
    rl_modes: Annotated[
        str, typer.Option(help="Comma-separated: grpo, sibling, joint.")
    ] = "grpo,sibling,joint",
    register: Annotated[
        bool, typer.Option(help="Register the first seed's generators as genret retrievers.")
    ] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
) -> None:
    """Train the baselines and the generator, fine-tune with RL, and print the comparison tables."""
    if synthetic_preset is not None and vectors != "sasrec":
        vectors = "sasrec"  # synthetic items have no MovieLens attributes
    try:
        config = GenRetConfig(
            dataset=dataset,
            source_dir=source_dir,
            synthetic_preset=synthetic_preset,
            seeds=tuple(range(seeds)),
            vectors=vectors,  # type: ignore[arg-type]
            semantic_ids=SemanticIdConfig(method=method, codebook_size=codebook_size),  # type: ignore[arg-type]
            loop=LoopConfig(max_epochs=max_epochs, patience=patience, eval_every=2, progress=False),
            sasrec_loop=LoopConfig(max_epochs=sasrec_epochs, patience=patience, eval_every=2, progress=False),
            baselines=split_csv(baselines),  # type: ignore[arg-type]
            sasrec_max_len=baseline_max_len,
            generator=GeneratorConfig(max_items=max_items),
            rl=RLConfig(steps=rl_steps, modes=split_csv(rl_modes)),  # type: ignore[arg-type]
            beam=beam,
            curve_beams=_ints(curve_beams),
            top_k=top_k,
            cost_beams=_ints(cost_beams),
            cost_users=cost_users,
            register_models=register,
        )
    except ValueError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    result = run_genret_experiment(config, echo=typer.echo)
    typer.echo(format_report(result))
    typer.echo(
        f"report: {result.report_path}; chart: {result.chart_path} ({time.perf_counter() - started:.0f} s)"
    )


@dataclass
class GenRetABResult:
    experiment_id: str
    lift_table: str
    true_ctr: Any  # simulation.stats.DiffEstimate: per-user mean true P(click), treatment vs control
    impressions: dict[str, int]


def run_genret_ab(
    dataset: str,
    control: str,
    treatment: str,
    simulation: Any,
    paths: PathsConfig | None = None,
    *,
    beam: int | None = None,
    policy_temperature: float = 1.0,
) -> GenRetABResult:
    """A simulated A/B test of two registered generators (served by constrained beam search, in process) on
    a synthetic dataset, published like ``recsys ab run``; judged also by the world's true click
    probability of every served slot (position-free x examination, what the simulated clicks are drawn
    from): per user, the mean true P(click) of the slots served in the experiment, Welch over users."""
    from recsys.serving.service import Recommender, ServingConfig
    from recsys.simulation.arms import InProcessArm
    from recsys.simulation.experiment import ABExperimentConfig, run_ab_experiment
    from recsys.simulation.response import TrueResponse
    from recsys.simulation.stats import welch_test

    paths = paths or PathsConfig()
    with Warehouse(paths.warehouse, read_only=True) as wh:
        latest = wh.latest(f"{dataset}.events")
        if latest is None or "synthetic_config" not in latest.inputs:
            raise ValueError(f"dataset {dataset!r}: the A/B test needs a synthetic dataset (its true world)")
        world = TrueResponse.from_warehouse(wh, dataset, synthetic_config(wh, dataset, paths))
    names = {"control": control.split(":", 1)[0], "treatment": treatment.split(":", 1)[0]}
    if names["control"] == names["treatment"]:
        raise ValueError("control and treatment must be different registered models")
    arms = {
        names[role]: InProcessArm(
            Recommender.from_config(
                ServingConfig(
                    retriever=tag,
                    beam_width=beam,
                    policy_temperature=policy_temperature,
                    max_k=200,
                    max_history=100_000,
                    log_impressions=False,
                    device="cpu",
                    request_id_seed=simulation.seed,
                )
            ),
            name=tag,
        )
        for role, tag in (("control", control), ("treatment", treatment))
    }
    sim = simulation.model_copy(update={"arms": (names["control"], names["treatment"]), "control": None})
    config = ABExperimentConfig(
        name=f"{names['treatment']} vs {names['control']}", dataset=dataset, simulation=sim
    )
    try:
        result = run_ab_experiment(
            config, arms, world, warehouse=paths.warehouse, data_version=latest.version
        )
    finally:
        for arm in arms.values():
            arm.close()
    served = result.log.experiment()
    per_user = served.group_by("arm", "user_id").agg(pl.col("p_click").mean().alias("p"))
    values = {a: per_user.filter(pl.col("arm") == a)["p"].to_numpy() for a in arms}
    true_ctr = welch_test(values[names["treatment"]], values[names["control"]])
    counts = {a: int(served.filter(pl.col("arm") == a).height) for a in arms}
    return GenRetABResult(result.experiment_id, result.lift_table, true_ctr, counts)


@app.command("ab")
def ab_command(
    control: Annotated[str, typer.Argument(help="Registered generator tag of the control arm.")],
    treatment: Annotated[str, typer.Argument(help="Registered generator tag of the treatment arm.")],
    dataset: Annotated[str, typer.Option(help="The synthetic dataset the generators were trained on.")],
    days: Annotated[int, typer.Option(min=1)] = 10,
    users_per_day: Annotated[int, typer.Option(min=2)] = 100,
    pre_days: Annotated[int, typer.Option(min=0)] = 3,
    session_length: Annotated[int, typer.Option(min=1)] = 10,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    beam: Annotated[int | None, typer.Option(min=1, help="Beam width (default: the registered one).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
) -> None:
    """Simulated A/B test of two generators, judged by the simulator's true click probability."""
    from recsys.simulation.simulator import SimulationConfig

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        simulation = SimulationConfig(
            days=days,
            users_per_day=users_per_day,
            pre_period_days=pre_days,
            session_length=session_length,
            seed=seed,
        )
        result = run_genret_ab(dataset, control, treatment, simulation, beam=beam)
    except ValueError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    d = result.true_ctr
    typer.echo(f"experiment {result.experiment_id}; served slots {result.impressions}\n")
    typer.echo(result.lift_table)
    typer.echo(
        f"\ntrue CTR (mean true P(click) of the served slots per user; Welch over users): control "
        f"{d.mean_control:.5f} (n={d.n_control:.0f}), treatment {d.mean_treatment:.5f} "
        f"(n={d.n_treatment:.0f}); "
        f"lift {d.lift:+.2%} [{d.lift_ci_low:+.2%}, {d.lift_ci_high:+.2%}], diff {d.diff:+.5f} "
        f"[{d.ci_low:+.5f}, {d.ci_high:+.5f}], p = {d.p_value:.3g}"
    )


if __name__ == "__main__":
    app()
