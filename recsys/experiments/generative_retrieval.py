"""Generative retrieval experiment: semantic IDs -> TIGER-style generator -> V-STAR (value-guided decoding,
GRPO / Sibling-GRPO) against SASRec, leave-one-out on one dataset.

Pipeline per seed: the leave-one-out split (``experiments.retrieval.prepare_split``) -> SASRec
(``training.retrieval.train_retrieval``) -> item vectors (attributes, SASRec item embedding or both) ->
semantic IDs (published as ``<ds>.semantic_ids``) -> supervised next-ID training of the generator with the
shared loop (``training.loop.fit``, early stopping on validation NDCG@10 of beam search) -> value head
trained on sampled candidates' rewards -> RL fine-tuning per mode -> test: beam search and value-guided
decoding, ranks from the decoded list (an item not generated ranks last), the decoding-budget curve at
equal model calls, paired tests against SASRec.

Reward (training users' last training item as the held-out next item, never a validation/test target):
R = 1[generated item = next item] + w * p, p = the SASRec percentile of the generated item for that user
(0 for items the user has seen). The hit term is the metric itself but is sparse (a few per cent of samples
hit); the SASRec term gives a graded signal from a model trained on the same training part.
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
import torch
import typer
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel, PathsConfig
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
    TokenLayout,
    beam_search,
    next_token_loss,
    rl_loss,
    sample_candidates,
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

KS = (10,)
Decoder = Callable[[PolicyEvaluator, list[set[int]]], SearchResult]


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
    vectors: Literal["attributes", "sasrec", "both"] = "both"
    semantic_ids: SemanticIdConfig = SemanticIdConfig()
    generator: GeneratorConfig = GeneratorConfig()
    batch_size: int = Field(64, gt=0)
    loop: LoopConfig = LoopConfig(max_epochs=10, patience=2, eval_every=2, progress=False)
    sasrec_loop: LoopConfig = LoopConfig(max_epochs=20, patience=2, eval_every=2, progress=False)
    sasrec_max_len: int = Field(200, gt=0)
    rl: RLConfig = RLConfig()
    beam: int = Field(10, ge=1, description="Beam width of the main table.")
    curve_beams: tuple[int, ...] = (4, 10)
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
    ranks, calls = decoded_ranks(model, trie, cases, decoder, batch_size)
    metrics = metrics_from_ranks(ranks, KS)
    return RetrievalEvaluation(metrics, cases.users.copy(), ranks, None, KS), float(calls.mean())


def beam_decoder(width: int) -> Decoder:
    return lambda ev, exclude: beam_search(ev, width, exclude)


def ved_decoder(beam: int, budget: int, lam: float) -> Decoder:
    return lambda ev, exclude: value_guided_search(ev, beam, budget, lam, exclude)


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
        v = split.valid
        n = len(v) if valid_users is None else min(valid_users, len(v))
        self.valid = EvalCases(v.users[:n], v.histories[:n], v.history_ts[:n], v.targets[:n], v.target_ts[:n])
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
    data: RLData,
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


@dataclass
class SeedResult:
    seed: int
    sasrec: RetrievalEvaluation
    variants: dict[str, Variant]
    curve: list[tuple[str, int, float, float, float]]  # (decoder, beam, calls, hr@10, ndcg@10)
    rl_logs: dict[str, list[dict[str, float]]]
    ids_summary: dict[str, float]
    train_time_s: float
    best_epoch: int
    epochs_run: int


@dataclass
class GenRetResult:
    config: GenRetConfig
    num_items: int
    num_test: int
    seeds: list[SeedResult]
    tests: list[PairedTest] = field(default_factory=list)
    hardware: str = ""
    report_path: Path | None = None


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


def run_seed(
    config: GenRetConfig, split: LeaveOneOutSplit, data_version: str, paths: PathsConfig, seed: int, say: Any
) -> SeedResult:
    sasrec_run = train_retrieval(
        "sasrec",
        split,
        seed=seed,
        train_config=RetrievalTrainConfig(max_len=config.sasrec_max_len, ks=(10,)),
        loop_config=config.sasrec_loop,
        dataset=config.dataset,
        data_version=data_version,
    )
    sasrec = sasrec_run.model
    assert sasrec is not None
    say(f"seed {seed}: SASRec test ndcg@10 {sasrec_run.test.metrics['ndcg@10']:.4f}")

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

    data = sasrec_percentiles(sasrec, split, config.sasrec_max_len)
    rl_logs = {"value": rl_finetune(model, trie, data, "value", config.rl, seed)}
    test, bs = split.test, config.eval_batch_size
    full_calls = 1 + (ids.codes.shape[1] - 1) * config.beam
    half = max(1, config.beam // 2)
    ved_budget = full_calls - (1 + (ids.codes.shape[1] - 1) * half)
    variants: dict[str, Variant] = {}

    def add(name: str, m: GenerativeRetriever, decoder: Decoder) -> None:
        evaluation, calls = evaluate_decoder(m, trie, test, decoder, bs)
        variants[name] = Variant(name, evaluation, calls)
        say(f"seed {seed}: {name} ndcg@10 {evaluation.metrics['ndcg@10']:.4f} calls {calls:.1f}")

    add(f"GR beam {config.beam}", model, beam_decoder(config.beam))
    add(f"GR VED {half}+{ved_budget}", model, ved_decoder(half, ved_budget, config.lam))
    curve = []
    for b in config.curve_beams:
        h = max(1, b // 2)
        budget = (1 + (ids.codes.shape[1] - 1) * b) - (1 + (ids.codes.shape[1] - 1) * h)
        for name, decoder in (("beam", beam_decoder(b)), ("VED", ved_decoder(h, budget, config.lam))):
            if b == config.beam:  # the main table's runs: not decoded twice
                v = variants[f"GR beam {b}" if name == "beam" else f"GR VED {h}+{budget}"]
                evaluation, calls = v.evaluation, v.calls
            else:
                evaluation, calls = evaluate_decoder(model, trie, test, decoder, bs)
            curve.append((name, b, calls, evaluation.metrics["hr@10"], evaluation.metrics["ndcg@10"]))
    for mode in config.rl.modes:
        tuned = copy.deepcopy(model)
        rl_logs[mode] = rl_finetune(tuned, trie, data, mode, config.rl, seed)
        add(f"GR+{mode} beam {config.beam}", tuned, beam_decoder(config.beam))
        add(f"GR+{mode} VED {half}+{ved_budget}", tuned, ved_decoder(half, ved_budget, config.lam))
    return SeedResult(
        seed,
        sasrec_run.test,
        variants,
        curve,
        rl_logs,
        ids.summary(),
        fitted.train_time_s,
        fitted.best_epoch,
        fitted.epochs_run,
    )


def run_genret_experiment(
    config: GenRetConfig, paths: PathsConfig | None = None, *, echo: Any = None
) -> GenRetResult:
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
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
    seeds = [run_seed(config, split, data_version, paths, s, say) for s in config.seeds]
    result = GenRetResult(
        config, split.num_items, len(split.test), seeds, paired_tests(seeds), hardware_description()
    )
    result.report_path = write_report(
        paths.home / "reports" / f"genret_{config.dataset}.md", format_report(result)
    )
    return result


def paired_tests(seeds: list[SeedResult]) -> list[PairedTest]:
    """Every generator variant against SASRec on NDCG@10: over users (first seed) and over seeds."""
    tests: list[PairedTest] = []
    first = seeds[0]
    for name, v in first.variants.items():
        tests += paired_tests_over_users(
            v.evaluation.per_user("ndcg@10"),
            first.sasrec.per_user("ndcg@10"),
            metric="ndcg@10",
            a_name=name,
            b_name="sasrec",
        )
        if len(seeds) > 1:
            tests.append(
                paired_t_over_seeds(
                    [s.variants[name].evaluation.metrics["ndcg@10"] for s in seeds],
                    [s.sasrec.metrics["ndcg@10"] for s in seeds],
                    metric="ndcg@10",
                    a_name=name,
                    b_name="sasrec",
                )
            )
    return tests


def format_report(result: GenRetResult) -> str:
    c = result.config
    lines = [
        f"# Generative retrieval: {c.dataset}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {result.hardware}; "
        f"{result.num_items} items, {result.num_test} test users; seeds {list(c.seeds)}; item vectors "
        f"{c.vectors}; semantic ids {c.semantic_ids.method} K={c.semantic_ids.codebook_size} x "
        f"{c.semantic_ids.levels} + dedup.",
        "",
        "Leave-one-out, full ranking from the decoded list (history items excluded; an item not generated "
        "ranks last). Calls = policy evaluations at prefix nodes per user.",
        "",
    ]
    lines += markdown_head(["Model", "HR@10", "NDCG@10", "Calls/user"])
    lines.append(
        markdown_row(
            [
                "SASRec",
                summarize([s.sasrec.metrics["hr@10"] for s in result.seeds]).format(),
                summarize([s.sasrec.metrics["ndcg@10"] for s in result.seeds]).format(),
                "full scoring",
            ]
        )
    )
    for name in result.seeds[0].variants:
        vs = [s.variants[name] for s in result.seeds]
        lines.append(
            markdown_row(
                [
                    name,
                    summarize([v.evaluation.metrics["hr@10"] for v in vs]).format(),
                    summarize([v.evaluation.metrics["ndcg@10"] for v in vs]).format(),
                    f"{np.mean([v.calls for v in vs]):.1f}",
                ]
            )
        )
    lines += ["", "## Decoding budget (supervised generator + value head; seed " + str(c.seeds[0]) + ")", ""]
    lines += markdown_head(
        ["Decoder", "Beam (VED: beam/2 + rest as budget)", "Calls/user", "HR@10", "NDCG@10"]
    )
    for name, b, calls, hr, ndcg in result.seeds[0].curve:
        lines.append(markdown_row([name, str(b), f"{calls:.1f}", f"{hr:.4f}", f"{ndcg:.4f}"]))
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
    lines += ["", "## Significance", ""]
    lines += [f"- {t.format()}" for t in result.tests]
    return "\n".join(lines) + "\n"


app = typer.Typer(help="Generative retrieval with semantic IDs and V-STAR.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Generative retrieval with semantic IDs and V-STAR."""


@app.command("run")
def run_command(
    dataset: Annotated[str, typer.Option(help="Warehouse schema name.")] = "ml100k",
    source_dir: Annotated[Path | None, typer.Option(help="Unzipped MovieLens-100K folder.")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Number of seeds (0..n-1).")] = 1,
    vectors: Annotated[str, typer.Option(help="attributes, sasrec or both.")] = "both",
    method: Annotated[str, typer.Option(help="rq-kmeans or rq-vae.")] = "rq-kmeans",
    codebook_size: Annotated[int, typer.Option(min=2)] = 32,
    max_epochs: Annotated[int, typer.Option(min=1)] = 10,
    sasrec_epochs: Annotated[int, typer.Option(min=1)] = 20,
    rl_steps: Annotated[int, typer.Option(min=0)] = 40,
    beam: Annotated[int, typer.Option(min=1)] = 10,
    curve_beams: Annotated[
        str, typer.Option(help="Comma-separated beam widths of the budget curve.")
    ] = "4,10",
    max_items: Annotated[int, typer.Option(min=1, help="History items the generator reads.")] = 20,
    rl_modes: Annotated[
        str, typer.Option(help="Comma-separated: grpo, sibling, joint.")
    ] = "grpo,sibling,joint",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
) -> None:
    """Train SASRec and the generator, fine-tune with RL, and print the comparison tables."""
    try:
        config = GenRetConfig(
            dataset=dataset,
            source_dir=source_dir,
            seeds=tuple(range(seeds)),
            vectors=vectors,  # type: ignore[arg-type]
            semantic_ids=SemanticIdConfig(method=method, codebook_size=codebook_size),  # type: ignore[arg-type]
            loop=LoopConfig(max_epochs=max_epochs, patience=2, eval_every=2, progress=False),
            sasrec_loop=LoopConfig(max_epochs=sasrec_epochs, patience=2, eval_every=2, progress=False),
            generator=GeneratorConfig(max_items=max_items),
            rl=RLConfig(steps=rl_steps, modes=split_csv(rl_modes)),  # type: ignore[arg-type]
            beam=beam,
            curve_beams=tuple(int(b) for b in split_csv(curve_beams)),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    result = run_genret_experiment(config, echo=typer.echo)
    typer.echo(format_report(result))
    typer.echo(f"report: {result.report_path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    app()
