"""Feature embedding: shared tables, padding, the deduplicated (unique-id) path, time gaps, tokenisation."""

from __future__ import annotations

import pytest
import torch

from recsys.models.batch import demo_spec, synthetic_batch
from recsys.models.embeddings import FeatureEmbedding, SemanticTokenizer, symlog, time_gap_bucket
from tests.models.ranking_checks import single_thread  # noqa: F401  (autouse fixture)


def _embedding(backend: str = "auto") -> FeatureEmbedding:
    torch.manual_seed(0)
    return FeatureEmbedding(demo_spec(), dim=6, unique_backend=backend)  # type: ignore[arg-type]


def test_side_field_shares_the_sparse_table_and_candidate_uses_it() -> None:
    emb = _embedding()
    assert emb._side_embedding("history", "category") is emb.sparse["category"]
    assert "history__rating_0" in emb.side  # a side field without a sparse twin gets its own table
    batch = synthetic_batch(demo_spec(), 5)
    expected = emb.item(batch.item_id) + emb.sparse["category"](batch.sparse["category"])
    torch.testing.assert_close(emb.candidate(batch), expected)
    assert emb.candidate_fields == ("category",)


def test_sequence_steps_and_padding() -> None:
    emb = _embedding()
    batch = synthetic_batch(demo_spec(), 5)
    seq = batch.sequences["history"]
    steps = emb.sequence(batch, "history")
    assert steps.shape == (5, 12, 6)
    assert torch.count_nonzero(steps[~seq.valid_mask()]) == 0
    b, pos = torch.nonzero(seq.valid_mask())[0].tolist()
    expected = (
        emb.item.weight[seq.item_ids[b, pos]]
        + emb.sparse["category"].weight[seq.side["category"][b, pos]]
        + emb.side["history__rating_0"].weight[seq.side["rating_0"][b, pos]]
    )
    torch.testing.assert_close(steps[b, pos], expected)
    mean = emb.pooled_sequence(batch, "history", "mean")
    manual = steps.sum(1) / seq.lengths.clamp_min(1).unsqueeze(1)
    torch.testing.assert_close(mean, manual)
    torch.testing.assert_close(emb.pooled_sequence(batch, "history", "sum"), steps.sum(1))


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
@pytest.mark.parametrize("pooled", [False, True])
def test_deduplicated_path_matches_plain_lookup_with_gradients(backend: str, pooled: bool) -> None:
    batch = synthetic_batch(demo_spec(), 6, seed=2)
    results = []
    for b in (batch, batch.deduplicated()):
        emb = _embedding(backend)
        out = emb.pooled_sequence(b, "history", "mean") if pooled else emb.sequence(b, "history")
        out.pow(2).sum().backward()
        results.append((out.detach(), emb.item.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    assert results[0][1][0].abs().sum() == 0  # the padding row never gets gradient


def test_time_gap_buckets() -> None:
    gaps = torch.tensor([0.0, 59.0, 60.0, 180.0, 3600.0, 1e12])
    # floor(log2(1 + minutes)): 0 min -> 0, ~1 min -> 0/1, 3 min -> 2, 60 min -> 5, huge -> clamped
    assert time_gap_bucket(gaps, 24).tolist() == [0, 0, 1, 2, 5, 23]
    emb = _embedding()
    batch = synthetic_batch(demo_spec(), 4)
    gap_emb = emb.time_gap_embedding(batch, "history")
    assert torch.count_nonzero(gap_emb[~batch.sequences["history"].valid_mask()]) == 0


def test_dense_token_and_symlog() -> None:
    torch.testing.assert_close(
        symlog(torch.tensor([-3.0, 0.0, 3.0])),
        torch.log1p(torch.tensor([3.0, 0.0, 3.0])) * torch.tensor([-1.0, 0.0, 1.0]),
    )
    emb = _embedding()
    batch = synthetic_batch(demo_spec(), 4)
    torch.testing.assert_close(emb.dense_token(batch), emb.dense(symlog(batch.dense)))
    no_dense = demo_spec().model_copy(update={"dense": ()})
    assert FeatureEmbedding(no_dense, 6).dense_token(synthetic_batch(no_dense, 4)) is None


def test_semantic_slots_order_and_tokenizer_chunks() -> None:
    emb = _embedding()
    batch = synthetic_batch(demo_spec(), 3)
    slots = emb.semantic_slots(batch, ("history",), "mean")
    # user (2 fields), candidate item id, item (1), context (1), dense token, pooled history
    assert slots.shape == (3, emb.n_semantic_slots(("history",)), 6) == (3, 7, 6)
    torch.testing.assert_close(slots[:, 0], emb.sparse["user"](batch.sparse["user"]))
    torch.testing.assert_close(slots[:, 2], emb.item(batch.item_id))
    # 7 * 6 = 42 values cut into 4 chunks of 11 (2 zeros of padding)
    tok = SemanticTokenizer(7, 6, n_tokens=4, token_dim=8, projection="per_token")
    assert tok.chunk == 11 and tok.pad == 2
    x = slots.detach().clone().requires_grad_(True)
    tok(x)[:, 0].sum().backward()
    grad = x.grad.flatten(1)
    assert grad[:, :11].abs().sum() > 0 and grad[:, 11:].abs().sum() == 0  # token 0 reads chunk 0 only
    assert SemanticTokenizer(7, 6, 4, 8, "shared")(slots).shape == (3, 4, 8)
    with pytest.raises(ValueError, match="projection"):
        SemanticTokenizer(7, 6, 4, 8, "both")  # type: ignore[arg-type]
