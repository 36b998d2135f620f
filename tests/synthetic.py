"""A tiny synthetic language with deterministic continuations, and a teacher trained on it.

The language: a fixed random permutation ``successor`` of the vocabulary; a document starts at a
random token and every next token is ``successor`` of the previous one.  A tiny Llama learns it
(next-token accuracy 1.0) in a couple of seconds on one CPU core, and a multi-token student can
in principle predict any number of tokens ahead from the last one, so a good conversion reaches
nearly ``k_max`` tokens per forward pass with the continuation unchanged.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


@attrs.frozen(eq=False)
class Language:
    """The synthetic language: token ``t`` is always followed by ``successor[t]``.

    Attributes:
      successor: ``(vocab,)`` int64 permutation.
    """

    successor: np.ndarray

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return int(self.successor.shape[0])

    def continue_from(self, token: int, length: int) -> list[int]:
        """The ``length`` tokens that follow ``token``."""
        out = []
        for _ in range(length):
            token = int(self.successor[token])
            out.append(token)
        return out

    def documents(self, count: int, length: int, seed: int = 0) -> list[list[int]]:
        """``count`` documents of ``length`` tokens, each from a random first token."""
        rng = np.random.default_rng(seed)
        starts = rng.integers(0, self.vocab_size, size=count)
        return [[int(s), *self.continue_from(int(s), length - 1)] for s in starts]


def make_language(vocab_size: int = 32, seed: int = 0) -> Language:
    """A language over ``vocab_size`` tokens with a seeded random successor permutation."""
    return Language(successor=np.random.default_rng(seed).permutation(vocab_size).astype(np.int64))


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    attn_implementation: str = "sdpa",
    intermediate_size: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 512,
    tie: bool = False,
    generation_pad: int | None = 0,
    **config: Any,
) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama: the one test model of the suite.

    Args:
      vocab_size: rows of the embedding.
      hidden_size, layers, heads, kv_heads, max_positions: the shape (intermediate size
        ``2 * hidden_size`` unless given).
      dtype: parameter dtype.
      seed: ``torch.manual_seed`` before the weights are drawn (``None``: the current state).
      attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flex_attention"``.
      tie: tie the input and output embeddings.
      generation_pad: the generation config's ``pad_token_id`` when the config sets none.
      **config: any other ``LlamaConfig`` field (``initializer_range``, token ids ...).
    """
    if seed is not None:
        torch.manual_seed(seed)
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        attn_implementation=attn_implementation,
        **config,
    )
    model = LlamaForCausalLM(llama_config).to(dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = generation_pad
    return model


def train_teacher(
    language: Language,
    *,
    steps: int = 150,
    batch_size: int = 32,
    length: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A tiny Llama trained by next-token cross-entropy until it speaks ``language``."""
    model = tiny_llama(language.vocab_size, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.tensor(language.documents(steps * batch_size, length, seed=seed + 1))
    model.train()
    for step in range(steps):
        batch = data[step * batch_size : (step + 1) * batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def next_token_accuracy(model: torch.nn.Module, language: Language, seed: int = 99) -> float:
    """Greedy next-token accuracy of ``model`` on fresh documents of ``language``."""
    batch = torch.tensor(language.documents(16, 24, seed=seed))
    with torch.no_grad():
        predicted = model(input_ids=batch).logits[:, :-1].argmax(-1)
    return float((predicted == batch[:, 1:]).float().mean())


# --- a tiny word-level tokenizer with a chat template (built offline) ---------------------------

WORDS = "what is two plus three the answer five a b c hello world".split()
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline, optionally with a tiny chat template."""
    specials = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"]
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        tokenizer.chat_template = TEMPLATE
    return tokenizer


BPE_CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "two plus three is five!",
    "hello world, hello there?",
]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style decoding) trained offline on ``BPE_CORPUS``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=80, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False
    )
    backend.train_from_iterator(BPE_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
