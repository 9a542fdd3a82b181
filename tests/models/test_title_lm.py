"""The title LM: tokenizer specials, causal masking and the key/value cache used by beam search."""

from __future__ import annotations

import pytest
import torch

from recsys.models.title_lm import (
    SPECIAL_TOKENS,
    TitleLM,
    TitleLMConfig,
    TitleTokenizerConfig,
    encode_titles,
    train_title_tokenizer,
)

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Misérables, Les (1995)", "Toy Story 2 (1999)"] * 5


def test_tokenizer_keeps_special_ids_and_round_trips_titles() -> None:
    tok = train_title_tokenizer(TITLES, TitleTokenizerConfig(vocab_size=300, min_frequency=1))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    ids = encode_titles(tok, TITLES[:4])
    assert all(min(x) >= len(SPECIAL_TOKENS) for x in ids)
    assert [tok.decode(x).strip() for x in ids] == TITLES[:4]
    assert ids[0][:2] == ids[3][:2]  # shared words share tokens: the trie shares the prefix
    with pytest.raises(ValueError, match="titles"):
        train_title_tokenizer(["", ""])


def _model() -> TitleLM:
    torch.manual_seed(0)
    return TitleLM(
        TitleLMConfig(
            vocab_size=40, max_positions=16, dim=16, num_layers=2, num_heads=2, mlp_dim=32, dropout=0.0
        )
    ).eval()


def test_cache_gives_the_same_states_as_one_pass() -> None:
    model = _model()
    tokens = torch.randint(4, 40, (3, 9))
    full, _ = model(tokens)
    head, cache = model(tokens[:, :5])
    step, cache = model(tokens[:, 5:7], cache)
    last, _ = model(tokens[:, 7:], cache)
    torch.testing.assert_close(torch.cat([head, step, last], dim=1), full, atol=1e-5, rtol=1e-5)
    assert model.logits(full).shape == (3, 9, 40)


def test_attention_is_causal_and_length_is_checked() -> None:
    model = _model()
    a = torch.randint(4, 40, (1, 8))
    b = a.clone()
    b[0, 6:] = 5
    ha, _ = model(a)
    hb, _ = model(b)
    torch.testing.assert_close(ha[:, :6], hb[:, :6])
    assert not torch.allclose(ha[:, 6:], hb[:, 6:])
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.randint(4, 40, (1, 17)))
    with pytest.raises(ValueError, match="divisible"):
        TitleLMConfig(vocab_size=40, dim=10, num_heads=3)
