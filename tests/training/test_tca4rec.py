"""TCA4Rec: the trie, the token-level CF distribution (hand-computed), constrained beam search, the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.evaluation.retrieval import EvalCases, evaluate_retrieval
from recsys.models.title_lm import TitleLM, TitleLMConfig
from recsys.training.tca4rec import (
    ANS_ID,
    EOS_ID,
    Example,
    PromptBuilder,
    TCATrainConfig,
    TitleTrie,
    beam_search,
    generative_score_fn,
    make_batch,
    tca_loss,
    train_title_lm,
)

# Items 1..5; item 5 repeats item 1's title (MovieLens has such duplicates).
TITLES = [[10, 11], [10, 12], [10, 11, 13], [14], [10, 11]]


def test_soft_labels_match_a_hand_computed_case() -> None:
    trie = TitleTrie(TITLES)
    # exp(z) = 1, 2, 3, 1, 2 for items 1..5 (column 0 is padding and must not count).
    z = torch.log(torch.tensor([[100.0, 1.0, 2.0, 3.0, 1.0, 2.0]]))
    prefixes = [[], [10], [10, 11], [14]]
    nodes = torch.tensor([trie.walk(p) for p in prefixes])
    labels = trie.soft_labels(z, torch.zeros(len(prefixes), dtype=torch.long), nodes, vocab_size=16)
    expected = torch.zeros(4, 16)
    expected[0, 10], expected[0, 14] = 8 / 9, 1 / 9  # C = all: {1,2,3,5} under token 10, {4} under 14
    expected[1, 11], expected[1, 12] = 6 / 8, 2 / 8  # C = {1,2,3,5}: {1,3,5} continue with 11, {2} with 12
    expected[2, EOS_ID], expected[2, 13] = 3 / 6, 3 / 6  # C = {1,3,5}: items 1 and 5 end here, 3 goes on
    expected[3, EOS_ID] = 1.0
    torch.testing.assert_close(labels, expected)


def test_soft_labels_are_batched_per_row_and_survive_large_logits() -> None:
    trie = TitleTrie(TITLES)
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 900.0, 0.0, 0.0, 0.0, 0.0]])
    root = torch.tensor([0, 0])
    labels = trie.soft_labels(z, torch.tensor([0, 1]), root, vocab_size=16)
    torch.testing.assert_close(labels[0, [10, 14]], torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(labels[1, [10, 14]], torch.tensor([1.0, 0.0]))
    far = trie.soft_labels(z, torch.tensor([1]), torch.tensor([trie.walk([14])]), vocab_size=16)
    assert far[0, EOS_ID] == pytest.approx(1.0)  # item 4 is e^-900 away from the max: still a distribution


def test_trie_rejects_special_tokens_and_knows_its_items() -> None:
    with pytest.raises(ValueError, match="special token"):
        TitleTrie([[10, EOS_ID]])
    trie = TitleTrie(TITLES)
    assert trie.terminal_items[trie.walk([10, 11, EOS_ID])] == [1, 5]
    assert trie.subtree_count[0] == 5 and trie.subtree_count[trie.walk([10])] == 4
    with pytest.raises(KeyError):
        trie.walk([12])


def _random_model(vocab: int, seed: int) -> TitleLM:
    torch.manual_seed(seed)
    return TitleLM(
        TitleLMConfig(
            vocab_size=vocab, max_positions=64, dim=16, num_layers=1, num_heads=2, mlp_dim=32, dropout=0.0
        )
    ).eval()


@torch.no_grad()
def _sequence_logprob(model: TitleLM, prompt: list[int], title: list[int], trie: TitleTrie) -> float:
    """Teacher-forced log-prob of ``title + <eos>``, renormalised over the trie's children at each step."""
    answer = [*title, EOS_ID]
    hidden, _ = model(torch.tensor([prompt + answer[:-1]]))
    logits = model.logits(hidden[0, len(prompt) - 1 :])
    total, node = 0.0, 0
    for j, tok in enumerate(answer):
        allowed = list(trie.children[node])
        total += float(torch.log_softmax(logits[j, allowed], 0)[allowed.index(tok)])
        node = trie.children[node][tok]
    return total


@pytest.mark.parametrize("seed", range(6))
def test_beam_search_yields_only_real_non_excluded_titles(seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = 30
    titles = [list(rng.integers(4, vocab, size=rng.integers(1, 5))) for _ in range(25)]
    trie = TitleTrie(titles)
    model = _random_model(vocab, seed)
    prompt = [*rng.integers(4, vocab, size=6).tolist(), ANS_ID]
    exclude = rng.choice(np.arange(1, 26), size=5, replace=False).tolist()
    found = beam_search(model, prompt, trie, width=8, exclude=exclude)
    items = [i for i, _ in found]
    assert len(items) == 8 and len(set(items)) == 8
    assert not set(items) & set(exclude)
    scores = [s for _, s in found]
    assert scores == sorted(scores, reverse=True)
    for item, score in found:  # the beam's score is the title's own (constrained) log-prob
        assert score == pytest.approx(_sequence_logprob(model, prompt, titles[item - 1], trie), abs=1e-4)


def test_exhaustive_beam_is_a_distribution_over_titles() -> None:
    vocab = 30
    trie = TitleTrie(TITLES)
    model = _random_model(vocab, 0)
    found = beam_search(model, [5, 6, ANS_ID], trie, width=10)
    assert sorted(i for i, _ in found) == [1, 2, 3, 4, 5]
    probs = dict(found)
    assert probs[1] == probs[5]  # duplicate titles share one terminal
    # Every distinct title once: the constrained probabilities sum to 1.
    assert sum(math.exp(probs[i]) for i in (1, 2, 3, 4)) == pytest.approx(1.0, abs=1e-5)
    assert beam_search(model, [5, ANS_ID], trie, width=3, exclude=[1, 2, 3, 4, 5]) == []
    with pytest.raises(ValueError, match="width"):
        beam_search(model, [5, ANS_ID], trie, width=0)


def test_loss_mixes_hard_and_soft_labels() -> None:
    trie = TitleTrie(TITLES)
    config = TCATrainConfig(history_items=2, alpha=0.0)
    prompts = PromptBuilder(TITLES, config)
    examples = [Example(np.array([1, 2, 4]), 3), Example(np.array([4]), 2)]
    batch = make_batch(examples, prompts, trie, cf_len=5)
    assert batch.tokens[0].tolist()[:7] == [10, 12, 1, 14, ANS_ID, 10, 11]  # last 2 titles, <sep>, <ans>
    assert batch.labels.tolist() == [10, 11, 13, EOS_ID, 10, 12, EOS_ID]
    model = _random_model(16, 1)
    hard = tca_loss(model, batch, trie, config, None)

    # A teacher that puts all mass on the target makes the soft label the one-hot label: same loss.
    def teacher(items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = torch.full((items.shape[0], 6), -1e4)
        z[0, 3], z[1, 2] = 0.0, 0.0
        return z

    mixed = tca_loss(model, batch, trie, config.model_copy(update={"alpha": 0.7}), teacher)
    assert mixed.item() == pytest.approx(hard.item(), rel=1e-5)
    with pytest.raises(ValueError, match="CF scorer"):
        tca_loss(model, batch, trie, config.model_copy(update={"alpha": 0.5}), None)


def test_training_lowers_the_loss() -> None:
    trie = TitleTrie(TITLES)
    config = TCATrainConfig(
        history_items=3, epochs=4, examples_per_epoch=None, batch_size=8, lr=5e-3, alpha=0.5
    )
    prompts = PromptBuilder(TITLES, config)
    rng = np.random.default_rng(0)
    train_items = [np.array([1, 2, 3, 4, 2, 1, 3])[rng.permutation(7)] for _ in range(8)]
    model = TitleLM(
        TitleLMConfig(vocab_size=16, max_positions=32, dim=16, num_layers=1, num_heads=2, mlp_dim=32)
    )

    def teacher(items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.zeros(items.shape[0], 6)

    result = train_title_lm(model, train_items, prompts, trie, config, teacher)
    assert len(result.losses) == 4 and result.losses[-1] < result.losses[0]
    assert not model.training
    with pytest.raises(ValueError, match="train_items"):
        train_title_lm(model, [np.array([1])], prompts, trie, config, teacher)


def test_generative_scores_rank_the_beam_and_tie_the_rest_last() -> None:
    trie = TitleTrie(TITLES)
    config = TCATrainConfig(history_items=2)
    prompts = PromptBuilder(TITLES, config)
    model = _random_model(16, 2)
    histories = [np.array([4, 2]), np.array([1])]
    cases = EvalCases(
        np.array([0, 1]),
        histories,
        [np.zeros(2, dtype=np.int64), np.zeros(1, dtype=np.int64)],
        np.array([3, 2]),
        np.zeros(2, dtype=np.int64),
    )
    score = generative_score_fn(model, prompts, trie, width=2)
    batch = cases.batch(np.arange(2), history_len=2)
    scores = score(batch)
    for r, history in enumerate(histories):
        beam = beam_search(model, prompts.prompt(history), trie, 2, history.tolist())
        assert [i for i in range(1, 6) if scores[r, i] > -1e9] == sorted(i for i, _ in beam)
        for item, lp in beam:
            assert scores[r, item].item() == pytest.approx(lp)
    result = evaluate_retrieval(score, cases, num_items=5, history_len=2, ks=(1, 10))
    ranks = [
        1 + sum(scores[r, i] >= scores[r, t] for i in range(1, 6) if i != t and i not in h)
        for r, (h, t) in enumerate(zip([set(x.tolist()) for x in histories], [3, 2], strict=True))
    ]
    assert result.ranks.tolist() == [int(x) for x in ranks]
