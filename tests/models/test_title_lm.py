"""The title LM: tokenizer specials, causal masking and the key/value cache used by beam search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.models.title_lm import (
    SPECIAL_TOKENS,
    HFCausalLM,
    LoRASettings,
    TitleLM,
    TitleLMConfig,
    TitleTokenizerConfig,
    encode_titles,
    train_title_tokenizer,
)
from recsys.training.tca4rec import PromptBuilder, TCATrainConfig, TitleTrie, beam_search, train_title_lm

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


@pytest.fixture
def tiny_hf_dir(tmp_path: Path) -> Path:
    """A randomly initialised GPT-2 and a small BPE tokenizer saved in Hugging Face format (no download)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    tok = train_title_tokenizer(TITLES, TitleTokenizerConfig(vocab_size=300, min_frequency=1))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(fast), n_positions=128, n_embd=16, n_layer=1, n_head=2, eos_token_id=fast.eos_token_id
    )
    path = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_local_hf_model_behind_the_title_lm_interface(tiny_hf_dir: Path) -> None:
    lm = HFCausalLM(tiny_hf_dir, LoRASettings(rank=2)).eval()
    s = lm.special
    assert len({s.sep, s.ans, s.eos}) == 3 and s.eos == lm.tokenizer.eos_token_id
    titles = lm.encode_titles(TITLES[:4])
    assert all(titles) and not any(set(t) & s.all for t in titles)
    tokens = torch.tensor([titles[0] + [s.sep] + titles[1] + [s.ans]])
    full, _ = lm(tokens)
    head, cache = lm(tokens[:, :-2])
    cache = lm.reorder_cache(cache, torch.tensor([0, 0]))  # one prompt grown to two beams
    step, _ = lm(tokens[:, -2:].repeat(2, 1), cache)
    torch.testing.assert_close(step[1], full[0, -2:], atol=1e-5, rtol=1e-5)
    assert lm.logits(full).shape[-1] >= len(lm.tokenizer)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    with pytest.raises(ValueError, match="lm_path"):
        HFCausalLM(tiny_hf_dir / "missing")


def test_local_hf_model_trains_lora_only_and_decodes_real_titles(tiny_hf_dir: Path) -> None:
    lm = HFCausalLM(tiny_hf_dir, LoRASettings(rank=2))
    titles = lm.encode_titles(TITLES[:4])
    trie = TitleTrie(titles, lm.special)
    config = TCATrainConfig(history_items=2, epochs=1, examples_per_epoch=None, batch_size=4, alpha=0.5)
    prompts = PromptBuilder(titles, config, lm.special)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}

    def teacher(items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.zeros(items.shape[0], 5)

    train_title_lm(lm, [np.array([1, 2, 3, 4, 1, 2])], prompts, trie, config, teacher)
    changed = {n for n, p in lm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora" in n for n in changed)
    found = beam_search(lm, prompts.prompt(np.array([1, 2])), trie, width=4, exclude=[1])
    assert sorted(i for i, _ in found) == [2, 3, 4]
