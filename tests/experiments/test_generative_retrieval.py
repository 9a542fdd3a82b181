"""The generative-retrieval experiment end to end on a tiny events file (SASRec -> semantic IDs -> generator
-> value head -> RL -> decoding -> report), the rank rule for items not generated, and the CLI's errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from recsys.core.config import PathsConfig
from recsys.evaluation.retrieval import EvalCases
from recsys.experiments.generative_retrieval import (
    GenRetConfig,
    RLConfig,
    TrueClickData,
    app,
    beam_decoder,
    decoded_ranks,
    load_synthetic,
    run_genret_experiment,
)
from recsys.experiments.retrieval import RetrievalExperimentConfig, prepare_split
from recsys.models.generative_retrieval import (
    GenerativeRetriever,
    GeneratorConfig,
    PolicyEvaluator,
    PrefixTrie,
    TokenLayout,
    beam_search,
)
from recsys.models.semantic_ids import SemanticIdConfig, SemanticIds, add_dedup_code
from recsys.serving.schemas import RecommendRequest
from recsys.serving.service import Recommender, ServingConfig
from recsys.synthetic.click_model import ClickModel
from recsys.synthetic.config import SyntheticConfig
from recsys.training.loop import LoopConfig
from recsys.warehouse import Warehouse


@pytest.fixture
def events_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp"]
    for user in range(1, 31):
        start, n = int(rng.integers(0, 12)), int(rng.integers(4, 9))
        lines += [f"{user},{100 + (start + i) % 12},{1_600_000_000 + 3600 * i}" for i in range(n)]
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_experiment_end_to_end(events_csv: Path, tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    loop = LoopConfig(max_epochs=1, patience=1, progress=False, device="cpu")
    config = GenRetConfig(
        dataset="tiny",
        events_path=events_csv,
        vectors="sasrec",
        semantic_ids=SemanticIdConfig(codebook_size=2),
        generator=GeneratorConfig(dim=16, heads=2, layers=1, max_items=8),
        loop=loop,
        sasrec_loop=loop,
        sasrec_max_len=8,
        rl=RLConfig(steps=2, users_per_step=4, group=3, modes=("sibling",)),
        beam=4,
        curve_beams=(2,),
        cost_beams=(1, 4),
        cost_users=5,
        register_models=True,
    )
    result = run_genret_experiment(config, paths)
    seed = result.seeds[0]
    assert set(seed.baselines) == {"sasrec", "hstu"}
    assert set(seed.variants) == {
        "GR beam 4",
        "GR VED 2+6",
        "GR top-5 sampling",
        "GR+sibling beam 4",
        "GR+sibling VED 2+6",
    }
    assert seed.variants["GR beam 4"].calls == pytest.approx(seed.variants["GR VED 2+6"].calls, abs=6)
    assert seed.variants["GR top-5 sampling"].calls <= 1 + 3 * 4  # beam 4's nominal calls
    for v in seed.variants.values():
        assert 0.0 <= v.evaluation.metrics["ndcg@10"] <= v.evaluation.metrics["hr@10"] <= 1.0
        assert v.evaluation.metrics["hr@10"] <= v.evaluation.metrics["hr@50"]
    assert [p.decoder for p in seed.curve] == ["beam", "VED", "top-K"]
    assert [c.beam for c in seed.cost] == [1, 4] and seed.cost[0].calls < seed.cost[1].calls
    report = (paths.home / "reports" / "genret_tiny.md").read_text()
    assert "| sasrec |" in report and "| hstu |" in report and "Decoding budget" in report
    assert "Wilcoxon signed-rank" in report and "Decoding cost against beam width" in report
    chart = (paths.home / "reports" / "genret_tiny_budget.html").read_text()
    assert "vega" in chart and "top-K" in chart
    # The registered generators serve through the engine: only real items come out.
    assert set(seed.registered) == {"supervised", "sibling"}
    engine = Recommender.from_config(
        ServingConfig(retriever=seed.registered["sibling"], log_impressions=False)
    )
    response = engine.recommend(
        RecommendRequest.model_validate({"history": [{"item_id": 100, "ts": 1}], "k": 5})
    )
    assert response.scored_by == "beam-search"
    assert {i.item_id for i in response.items} <= set(range(100, 112)) - {100}
    with Warehouse(paths.warehouse, read_only=True) as wh:
        table = wh.table("tiny.semantic_ids")
    assert table.height == result.num_items
    assert len({tuple(r[1:]) for r in table.iter_rows()}) == result.num_items


def test_items_not_generated_rank_last() -> None:
    codes = add_dedup_code(np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 1]]))
    ids = SemanticIds(codes, codebook_size=2, levels=3)
    model = GenerativeRetriever(TokenLayout(ids), GeneratorConfig(dim=8, heads=2, layers=1, max_items=4))
    cases = EvalCases(
        np.array([0, 1]),
        [np.array([1]), np.array([2])],
        [np.array([0]), np.array([0])],
        np.array([3, 1]),
        np.array([1, 1]),
    )
    trie = PrefixTrie(ids.codes)
    model.eval()
    top = beam_search(PolicyEvaluator(model, trie, cases.histories), 1, [{1}, {2}]).items
    ranks, calls = decoded_ranks(model, trie, cases, beam_decoder(1), 8)
    # Beam 1 returns one item: rank 1 when it is the target, else the target ranks last (num_items = 4).
    assert ranks.tolist() == [1 if top[u] == [t] else 4 for u, t in enumerate(cases.targets.tolist())]
    assert calls.tolist() == [4, 4]
    wide, _ = decoded_ranks(model, trie, cases, beam_decoder(4), 8)
    assert all(1 <= r <= 3 for r in wide.tolist())  # every non-history item is generated


def test_cli_rejects_a_bad_vector_source() -> None:
    result = CliRunner().invoke(app, ["run", "--vectors", "pixels"])
    assert result.exit_code != 0 and "vectors" in result.output


def test_synthetic_reward_is_the_true_click_probability_after_the_context(tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    load_synthetic(paths, "syn", "tiny")
    split, _ = prepare_split(
        paths.warehouse, RetrievalExperimentConfig(dataset="syn", models=("sasrec",), comparisons=())
    )
    data = TrueClickData(paths, "syn", split)
    rows = np.array([0, 3, 7])
    items = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    got = data.rewards(rows, items, dense_weight=0.5)
    # By hand: each user's own context clicks (training part minus its last item) replayed alone in the
    # generator's click model, scored at the time of the held-out next click.
    model = ClickModel(SyntheticConfig.preset("tiny", 0))
    keep = [i for i, s in enumerate(split.train_items) if len(s) >= 2]
    for r, row in enumerate(rows.tolist()):
        i = keep[row]
        context, ts = split.train_items[i][:-1], split.train_ts[i][:-1]
        user = np.array([data.users[row]])
        state = model.state_from_history(
            user, np.zeros(len(context), dtype=np.int64), data.item_ids[context], ts
        )
        logit = model.logit(state, data.item_ids[items[r]][None, :], np.array([split.train_ts[i][-1]]))
        np.testing.assert_allclose(got[r], 1.0 / (1.0 + np.exp(-logit[0])), rtol=1e-5)
    assert ((got > 0) & (got < 1)).all()
