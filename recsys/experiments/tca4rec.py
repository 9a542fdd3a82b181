"""TCA4Rec experiment: next-token-only title generation vs token-level collaborative alignment vs SASRec.

Pipeline per seed: the leave-one-out split of ``experiments.retrieval.prepare_split`` -> SASRec trained with
the shared retrieval trainer (it is both the baseline and the CF teacher) -> a byte-level BPE tokenizer over
the titles of the training interactions -> two title LMs of the same size from scratch, one with the
next-token loss only (alpha = 0), one with the TCA mix -> every model evaluated on the same test users:
full ranking, HR/NDCG@10; the LMs rank by trie-constrained beam search (items outside the beam tie last).
Paired t-tests over seeds and Wilcoxon/t over users (first seed); the markdown report goes to
``<home>/reports/tca4rec_<dataset>.md``.

``lm_path`` swaps the small LM for any local Hugging Face causal LM directory (its own tokenizer with
``<sep>`` and ``<ans>`` added; optionally LoRA adapters through peft); nothing is downloaded.

CLI: ``app`` (typer), ``run`` command; ``python -m recsys.experiments.tca4rec run --help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from pydantic import Field

from recsys.core.config import FrozenModel, PathsConfig, describe_config_error
from recsys.core.hashing import stable_hash
from recsys.evaluation.retrieval import PROTOCOL, EvalCases, RetrievalEvaluation, evaluate_retrieval
from recsys.evaluation.significance import (
    PairedTest,
    paired_t_over_seeds,
    paired_tests_over_users,
    summarize,
)
from recsys.experiments.common import (
    check_seeds,
    echo_table_and_tests,
    markdown_head,
    markdown_row,
    write_report,
)
from recsys.experiments.retrieval import RetrievalExperimentConfig, prepare_split
from recsys.models.title_lm import (
    LOCAL_SPECIAL_IDS,
    CausalTitleLM,
    HFCausalLM,
    LoRASettings,
    TitleLM,
    TitleLMConfig,
    TitleTokenizerConfig,
    encode_titles,
    train_title_tokenizer,
)
from recsys.training.loop import LoopConfig
from recsys.training.retrieval import RetrievalTrainConfig, train_retrieval
from recsys.training.tca4rec import (
    PromptBuilder,
    TCATrainConfig,
    TitleTrie,
    generative_score_fn,
    sasrec_cf_scorer,
    train_title_lm,
)
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import hardware_description

MODELS = ("next-token", "tca", "sasrec")
KS = (10,)


class LMSize(FrozenModel):
    dim: int = Field(96, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    mlp_dim: int = Field(256, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class TCA4RecExperimentConfig(FrozenModel):
    dataset: str = Field("ml100k", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Warehouse schema name.")
    source_dir: Path | None = Field(None, description="MovieLens-100K folder; None downloads it.")
    seeds: tuple[int, ...] = (0, 1, 2)
    tokenizer: TitleTokenizerConfig = TitleTokenizerConfig()
    lm: LMSize = LMSize()
    train: TCATrainConfig = TCATrainConfig()
    sasrec_train: RetrievalTrainConfig = RetrievalTrainConfig(max_len=50, ks=(10,))
    sasrec_loop: LoopConfig = LoopConfig(max_epochs=30, patience=5, device="cpu", progress=False)
    eval_users: int | None = Field(None, gt=0, description="Evaluate the first n test users; None = all.")
    lm_path: Path | None = Field(
        None, description="A local Hugging Face causal LM directory to fine-tune instead of the small LM."
    )
    lora: LoRASettings | None = Field(None, description="With lm_path: train LoRA adapters only (peft).")

    def model_post_init(self, _context: Any) -> None:
        check_seeds(self.seeds)
        if self.train.alpha == 0.0:
            raise ValueError("train.alpha: the TCA variant needs alpha > 0 (alpha = 0 is the next-token run)")
        if self.lora is not None and self.lm_path is None:
            raise ValueError("lora: LoRA applies to a local Hugging Face LM; set lm_path too")
        if self.train.beam_width < max(KS):
            raise ValueError(f"train.beam_width must be >= {max(KS)} to score HR/NDCG@{max(KS)}")


@dataclass
class SeedRun:
    seed: int
    evaluations: dict[str, RetrievalEvaluation]
    train_time_s: dict[str, float]
    num_parameters: dict[str, int]
    final_loss: dict[str, float]


@dataclass
class TCA4RecResult:
    config: TCA4RecExperimentConfig
    data_version: str
    num_items: int
    num_eval_users: int
    vocab_size: int
    mean_title_tokens: float
    runs: list[SeedRun]
    tests: list[PairedTest] = field(default_factory=list)
    hardware: str = ""
    report_path: Path | None = None


def load_titles(wh_path: Path, dataset: str) -> list[str]:
    """Titles of items 1..n in ``item_idx`` order (``<ds>.items`` joined to ``<ds>.item_index``)."""
    with Warehouse(wh_path) as wh:
        if not wh.has_table(f"{dataset}.items"):
            raise ValueError(
                f"dataset {dataset!r}: no {dataset}.items table with titles (TCA4Rec needs them)"
            )
        frame = wh.sql(
            f"SELECT x.item_idx, x.item_id, i.title FROM {dataset}.item_index x "
            f"LEFT JOIN {dataset}.items i USING (item_id) ORDER BY x.item_idx"
        )
    idx = frame["item_idx"].to_list()
    if idx != list(range(1, len(idx) + 1)):
        raise ValueError(f"{dataset}.item_index: item_idx must run 1..n without gaps")
    # An item without a title still needs a distinct text to be generated.
    return [
        t if t else f"item {i}"
        for i, t in zip(frame["item_id"].to_list(), frame["title"].to_list(), strict=True)
    ]


def _subset(cases: EvalCases, n: int | None) -> EvalCases:
    if n is None or n >= len(cases):
        return cases
    return EvalCases(
        cases.users[:n], cases.histories[:n], cases.history_ts[:n], cases.targets[:n], cases.target_ts[:n]
    )


def run_tca4rec_experiment(
    config: TCA4RecExperimentConfig, paths: PathsConfig | None = None, *, echo: Any = None
) -> TCA4RecResult:
    """Train SASRec, the next-token LM and the TCA LM per seed; evaluate, test and write the report."""
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    split, data_version = prepare_split(
        paths.warehouse, RetrievalExperimentConfig(dataset=config.dataset, source_dir=config.source_dir)
    )
    titles = load_titles(paths.warehouse, config.dataset)
    if len(titles) != split.num_items:
        raise ValueError(f"{config.dataset}: {len(titles)} titles for {split.num_items} items")
    if config.lm_path is None:
        # Tokenizer corpus: every title once, then once per training interaction (popular titles weigh more).
        corpus = titles + [titles[int(i) - 1] for items in split.train_items for i in items]
        tokenizer = train_title_tokenizer(corpus, config.tokenizer)
        title_tokens = encode_titles(tokenizer, titles)
        special = LOCAL_SPECIAL_IDS
        vocab_size = tokenizer.get_vocab_size()
    else:
        probe = HFCausalLM(config.lm_path)
        title_tokens = probe.encode_titles(titles)
        special = probe.special
        vocab_size = len(probe.tokenizer)
        del probe
    trie = TitleTrie(title_tokens, special)
    prompts = PromptBuilder(title_tokens, config.train, special)
    cases = _subset(split.test, config.eval_users)
    longest_prompt = config.train.history_items * (config.train.prompt_title_tokens + 1)
    lm_config = TitleLMConfig(
        vocab_size=vocab_size,
        max_positions=longest_prompt + trie.max_depth + 1,
        **config.lm.model_dump(),
    )

    def new_lm() -> CausalTitleLM:
        if config.lm_path is None:
            return TitleLM(lm_config)
        return HFCausalLM(config.lm_path, config.lora)

    say(
        f"{config.dataset}: {split.num_items} items, {len(split.train_users)} users, {len(cases)} evaluated; "
        f"vocab {lm_config.vocab_size}, {np.mean([len(t) for t in title_tokens]):.1f} tokens per title, "
        f"trie {trie.num_nodes} nodes"
    )
    result = TCA4RecResult(
        config,
        data_version,
        split.num_items,
        len(cases),
        lm_config.vocab_size,
        float(np.mean([len(t) for t in title_tokens])),
        [],
        hardware=hardware_description(),
    )
    for seed in config.seeds:
        key = stable_hash(
            "sasrec",
            config.sasrec_train,
            config.sasrec_loop.model_dump(mode="json", exclude={"progress", "resume"}),
            data_version,
            length=12,
        )
        sasrec = train_retrieval(
            "sasrec",
            split,
            seed=seed,
            train_config=config.sasrec_train,
            loop_config=config.sasrec_loop,
            checkpoint_dir=paths.artifacts / "tca4rec" / config.dataset / "sasrec" / f"seed{seed}-{key}",
            data_version=data_version,
            dataset=config.dataset,
        )
        assert sasrec.model is not None
        cf = sasrec_cf_scorer(sasrec.model)
        evaluations = {
            "sasrec": evaluate_retrieval(
                lambda b, cf=cf: cf(b.items, b.lengths).float(),
                cases,
                num_items=split.num_items,
                history_len=config.sasrec_train.max_len,
                ks=KS,
            )
        }
        times = {"sasrec": sasrec.train_time_s}
        params = {"sasrec": sasrec.num_parameters}
        losses: dict[str, float] = {}
        for name in ("next-token", "tca"):
            train_config = config.train.model_copy(
                update={"seed": seed, "alpha": 0.0 if name == "next-token" else config.train.alpha}
            )
            torch.manual_seed(seed)
            model = new_lm()
            fit = train_title_lm(
                model,
                split.train_items,
                prompts,
                trie,
                train_config,
                cf if name == "tca" else None,
                progress=lambda msg, n=name, s=seed: say(f"  {n} seed {s} {msg}"),
            )
            evaluations[name] = evaluate_retrieval(
                generative_score_fn(model, prompts, trie, config.train.beam_width),
                cases,
                num_items=split.num_items,
                history_len=config.train.history_items,
                ks=KS,
            )
            times[name], params[name], losses[name] = fit.train_time_s, fit.num_parameters, fit.losses[-1]
        result.runs.append(SeedRun(seed, evaluations, times, params, losses))
        # The report is rewritten after every seed, so a long run leaves its finished seeds behind.
        result.tests = paired_tests(result.runs)
        result.report_path = write_report(
            paths.home / "reports" / f"tca4rec_{config.dataset}.md", format_report(result)
        )
        say(
            f"seed {seed}: "
            + ", ".join(
                f"{m} ndcg@10 {e.metrics['ndcg@10']:.4f} hr@10 {e.metrics['hr@10']:.4f}"
                for m, e in ((m, evaluations[m]) for m in MODELS)
            )
        )
    return result


def paired_tests(runs: list[SeedRun]) -> list[PairedTest]:
    """TCA vs next-token and TCA vs SASRec: paired t over seeds (NDCG@10, HR@10), then Wilcoxon and t over
    users on the first seed (NDCG@10)."""
    tests: list[PairedTest] = []
    first = runs[0]
    for b in ("next-token", "sasrec"):
        for metric in ("ndcg@10", "hr@10"):
            tests.append(
                paired_t_over_seeds(
                    [r.evaluations["tca"].metrics[metric] for r in runs],
                    [r.evaluations[b].metrics[metric] for r in runs],
                    metric=metric,
                    a_name="tca",
                    b_name=b,
                )
            )
        for t in paired_tests_over_users(
            first.evaluations["tca"].per_user("ndcg@10"),
            first.evaluations[b].per_user("ndcg@10"),
            metric="ndcg@10",
            a_name="tca",
            b_name=b,
        ):
            tests.append(replace(t, test=f"{t.test}, seed {first.seed}"))
    return tests


def format_table(result: TCA4RecResult) -> str:
    lines = markdown_head(["Model", "HR@10", "NDCG@10", "Params", "Train time (s)"])
    for name in MODELS:
        lines.append(
            markdown_row(
                [
                    name,
                    summarize([r.evaluations[name].metrics["hr@10"] for r in result.runs]).format(),
                    summarize([r.evaluations[name].metrics["ndcg@10"] for r in result.runs]).format(),
                    f"{result.runs[0].num_parameters[name] / 1e3:.1f} k",
                    f"{summarize([r.train_time_s[name] for r in result.runs]).mean:.0f}",
                ]
            )
        )
    return "\n".join(lines)


def format_report(result: TCA4RecResult) -> str:
    c = result.config
    t = c.train
    if c.lm_path is None:
        lm_text = f"{c.lm.num_layers} layers, dim {c.lm.dim}, {c.lm.num_heads} heads, local BPE"
    else:
        lm_text = f"{c.lm_path.name} (local directory), " + (
            f"LoRA rank {c.lora.rank}" if c.lora else "all weights trained"
        )
    lines = [
        f"# TCA4Rec: {c.dataset}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {result.hardware}; data version "
        f"{result.data_version}; {result.num_items} items; {result.num_eval_users} test users; seeds "
        f"{', '.join(str(r.seed) for r in result.runs)} finished of {len(c.seeds)} planned "
        "(mean ± std over seeds).",
        "",
        f"Protocol: {PROTOCOL}; the LMs rank by trie-constrained beam search (width {t.beam_width}), items "
        "outside the beam tie last.",
        f"LM: {lm_text}, vocab {result.vocab_size} "
        f"({result.mean_title_tokens:.1f} tokens per title); prompt = last {t.history_items} titles; "
        f"{t.epochs} epochs of {t.examples_per_epoch or 'all'} examples, batch {t.batch_size}, lr {t.lr}. "
        f"TCA: alpha {t.alpha}, CF temperature {t.cf_temperature}, teacher SASRec (history "
        f"{c.sasrec_train.max_len}, at most {c.sasrec_loop.max_epochs} epochs, "
        f"patience {c.sasrec_loop.patience}).",
        "",
        format_table(result),
        "",
        "## Significance",
        "",
    ]
    lines += [f"- {x.format()}" for x in result.tests]
    lines += [
        "",
        "## Per seed",
        "",
        "| Model | Seed | HR@10 | NDCG@10 | Final training objective |",
        "|---|---|---|---|---|",
    ]
    for r in result.runs:
        for name in MODELS:
            loss = f"{r.final_loss[name]:.4f}" if name in r.final_loss else "-"
            m = r.evaluations[name].metrics
            lines.append(f"| {name} | {r.seed} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {loss} |")
    return "\n".join(lines) + "\n"


# -- CLI ----------------------------------------------------------------------------------------------------
app = typer.Typer(
    help="TCA4Rec: generative title recommendation with token-level CF alignment.", no_args_is_help=True
)


@app.callback()
def _group() -> None:
    """TCA4Rec: generative title recommendation with token-level CF alignment."""


@app.command("run")
def run_command(
    dataset: Annotated[str, typer.Option(help="Warehouse schema name of the dataset.")] = "ml100k",
    source_dir: Annotated[
        Path | None, typer.Option(help="Unzipped MovieLens-100K folder (default: download).")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Number of seeds (0..n-1).")] = 3,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight of the CF soft label.")] = 0.5,
    epochs: Annotated[int, typer.Option(min=1, help="LM epochs.")] = 3,
    examples_per_epoch: Annotated[int, typer.Option(min=1, help="LM training examples per epoch.")] = 20000,
    beam_width: Annotated[int, typer.Option(min=1)] = 20,
    dim: Annotated[int, typer.Option(min=8, help="LM width.")] = 96,
    layers: Annotated[int, typer.Option(min=1, help="LM layers.")] = 2,
    sasrec_epochs: Annotated[int, typer.Option(min=1)] = 30,
    eval_users: Annotated[
        int | None, typer.Option(min=1, help="Evaluate only the first n test users.")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    lm_path: Annotated[
        Path | None, typer.Option(help="Local Hugging Face causal LM directory (instead of the small LM).")
    ] = None,
    lora_rank: Annotated[
        int | None, typer.Option(min=1, help="With --lm-path: train LoRA adapters of this rank only.")
    ] = None,
) -> None:
    """Train SASRec, a next-token title LM and a TCA title LM per seed; print the table and the tests."""
    try:
        config = TCA4RecExperimentConfig(
            dataset=dataset,
            source_dir=source_dir,
            seeds=tuple(range(seeds)),
            lm=LMSize(dim=dim, num_layers=layers),
            train=TCATrainConfig(
                alpha=alpha, epochs=epochs, examples_per_epoch=examples_per_epoch, beam_width=beam_width
            ),
            sasrec_loop=LoopConfig(max_epochs=sasrec_epochs, patience=5, device="cpu", progress=False),
            eval_users=eval_users,
            lm_path=lm_path,
            lora=None if lora_rank is None else LoRASettings(rank=lora_rank),
        )
    except ValueError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    if threads is not None:
        torch.set_num_threads(threads)
    result = run_tca4rec_experiment(config, echo=typer.echo)
    echo_table_and_tests(format_table(result), result.tests)
    typer.echo(f"\nreport: {result.report_path}")


if __name__ == "__main__":
    app()
