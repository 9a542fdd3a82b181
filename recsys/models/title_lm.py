"""A small decoder-only language model over item titles, with a locally trained byte-level BPE tokenizer.

The generative recommender of TCA4Rec (specs/models.md) reads a user's recent history as text (titles joined
by a separator token) and writes the next item's title token by token. Nothing is downloaded: the tokenizer
is trained here on the titles (each title once, then once per interaction so frequent titles shape the merges)
and the model is trained from scratch.

Prompt layout: ``t_1 <sep> t_2 <sep> ... t_n <ans> y_1 ... y_m <eos>``; the title of the next item is
``y_1..y_m``; the loss covers ``y_1..y_m <eos>`` only.

Architecture: token + learned position embeddings, pre-LayerNorm blocks (causal multi-head attention, GELU
MLP), a final LayerNorm and an output head tied to the token embedding. ``forward`` takes an optional
key/value cache so that beam search encodes the history once and then feeds one token per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from recsys.core.config import FrozenModel

PAD, SEP, ANS, EOS = "<pad>", "<sep>", "<ans>", "<eos>"
SPECIAL_TOKENS = (PAD, SEP, ANS, EOS)

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the prompts, the trie and the beam rely on; a title never contains any of them."""

    pad: int = 0
    sep: int = 1
    ans: int = 2
    eos: int = 3

    @property
    def all(self) -> frozenset[int]:
        return frozenset((self.pad, self.sep, self.ans, self.eos))


#: The ids of the locally trained tokenizer (``train_title_tokenizer``).
LOCAL_SPECIAL_IDS = SpecialIds()


class TitleTokenizerConfig(FrozenModel):
    vocab_size: int = Field(1000, ge=300, description="BPE vocabulary incl. 256 byte symbols and specials.")
    min_frequency: int = Field(2, ge=1)


def train_title_tokenizer(titles: Iterable[str], config: TitleTokenizerConfig | None = None) -> Tokenizer:
    """Byte-level BPE trained on ``titles``; ids 0..3 are ``<pad> <sep> <ans> <eos>``."""
    config = config or TitleTokenizerConfig()
    corpus = [t for t in titles if t]
    if not corpus:
        raise ValueError("titles: need at least one non-empty title to train the tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(
                f"tokenizer: special token {name} got id {tok.token_to_id(name)}, expected {i}"
            )
    return tok


def encode_titles(tokenizer: Tokenizer, titles: Sequence[str]) -> list[list[int]]:
    """Token ids of each title (no special tokens)."""
    return [e.ids for e in tokenizer.encode_batch(list(titles), add_special_tokens=False)]


class TitleLMConfig(FrozenModel):
    vocab_size: int = Field(gt=len(SPECIAL_TOKENS), description="Tokenizer vocabulary size.")
    max_positions: int = Field(256, gt=0, description="Longest prompt + answer, in tokens.")
    dim: int = Field(96, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    mlp_dim: int = Field(256, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> TitleLMConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        return self


class _Block(nn.Module):
    def __init__(self, config: TitleLMConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.dropout = config.dropout
        self.norm1 = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.mlp_dim),
            nn.GELU(),
            nn.Linear(config.mlp_dim, config.dim),
            nn.Dropout(config.dropout),
        )

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # [B, H, n, d/H]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        total = k.shape[2]
        # New queries sit at the end: query i sees keys 0..(total - n + i). Right padding needs no key mask.
        mask = torch.ones(n, total, dtype=torch.bool, device=x.device).tril(diagonal=total - n)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, n, d/H]
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        x = x + self.mlp(self.norm2(x))
        return x, (k, v)


class TitleLM(nn.Module):
    """[B, T] token ids -> [B, T, D] hidden states; ``logits`` maps them to the vocabulary (tied head)."""

    def __init__(self, config: TitleLMConfig) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.dim)
        self.positions = nn.Embedding(config.max_positions, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        start = 0 if past is None else past[0][0].shape[2]
        n = tokens.shape[1]
        if start + n > self.config.max_positions:
            raise ValueError(
                f"sequence of {start + n} tokens exceeds max_positions ({self.config.max_positions})"
            )
        pos = torch.arange(start, start + n, device=tokens.device)
        x = self.drop(self.tokens(tokens) + self.positions(pos))
        cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            cache.append(kv)
        return self.norm(x), cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.tokens.weight.T  # [..., V]

    def reorder_cache(self, cache: KVCache, index: torch.Tensor) -> KVCache:
        """The cache rows of ``index`` (beam search keeps, drops and copies hypotheses)."""
        return [(k[index], v[index]) for k, v in cache]


class LoRASettings(FrozenModel):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | tuple[str, ...] = Field("all-linear", description="peft's target_modules.")


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM from a local directory behind ``TitleLM``'s interface (hidden states, tied-or-
    not output head, a reorderable cache). ``<sep>`` and ``<ans>`` are added to its tokenizer as special
    tokens (the embedding table grows by two rows); ``<eos>`` is the tokenizer's own. With ``lora``, only
    LoRA adapters (peft) are trained."""

    def __init__(self, path: str | Path, lora: LoRASettings | None = None) -> None:
        super().__init__()
        try:
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ImportError(
                "lm_path: loading a local causal LM needs transformers (pip install transformers)"
            ) from exc
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"lm_path: {path} is not a directory with a Hugging Face model")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"lm_path: the tokenizer in {path} has no eos token")
        self.tokenizer.add_special_tokens({"additional_special_tokens": [SEP, ANS]})
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        sep, ans = self.tokenizer.convert_tokens_to_ids([SEP, ANS])
        eos = int(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        # Right padding sits after every supervised position (causal attention), so any id pads.
        self.special = SpecialIds(pad=eos if pad is None else int(pad), sep=int(sep), ans=int(ans), eos=eos)
        if lora is not None:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as exc:
                raise ImportError("lora: LoRA needs peft (pip install peft)") from exc
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules)
                    if isinstance(lora.target_modules, tuple)
                    else lora.target_modules,
                ),
            )
        self.model = model
        # transformers 5 renamed the cache argument; older versions take past_key_values.
        self._cache_arg = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"

    def encode_titles(self, titles: Sequence[str]) -> list[list[int]]:
        ids = self.tokenizer(list(titles), add_special_tokens=False)["input_ids"]
        return [[int(t) for t in x if int(t) not in self.special.all] for x in ids]

    def forward(self, tokens: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, Any]:
        kwargs = {self._cache_arg: past} if past is not None else {}
        out = self.model(input_ids=tokens, use_cache=True, output_hidden_states=True, **kwargs)
        return out.hidden_states[-1], out.past_key_values

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def reorder_cache(self, cache: Any, index: torch.Tensor) -> Any:
        cache.reorder_cache(index)
        return cache


#: What the TCA4Rec trainer and beam search accept.
CausalTitleLM = TitleLM | HFCausalLM
