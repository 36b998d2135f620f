"""A tiny exact backend for testing the decode engine without a neural network.

The "model" is a hash: the output at a slot is a function of the ordered (position, token) pairs
the slot can see (the visible cached slots, then the block's visible slots up to itself).  So any
mistake of the engine in positions, visibility, cropping, holes or compaction changes the output,
and a reference greedy loop is a few lines.
"""

from __future__ import annotations

import attrs
import numpy as np

from mtp_core import Sampling, StepInputs, StepOutputs

Context = tuple[tuple[int, int], ...]


def toy_output(context: Context, vocab_size: int) -> tuple[int, float]:
    """(token, confidence) the toy model emits after seeing ``context`` (position, token) pairs."""
    digest = 0
    for position, token in context:
        digest = (digest * 1_000_003 + (position + 1) * 7919 + token * 104_729 + 17) % (2**61 - 1)
    token = digest % vocab_size
    confidence = ((digest // vocab_size) % 1000) / 999.0
    return int(token), float(confidence)


@attrs.define
class ToyCache:
    """Per row, the (position, token) of every slot; all rows have the same number of slots."""

    slots: list[list[tuple[int, int]]]


@attrs.define
class ToyBackend:
    """Implements ``mtp_core.Backend`` with ``toy_output`` as the model."""

    vocab_size: int = 3
    forward_calls: int = 0
    compactions: int = 0

    def new_cache(self, batch_size: int) -> ToyCache:
        return ToyCache(slots=[[] for _ in range(batch_size)])

    def cache_length(self, cache: ToyCache) -> int:
        return len(cache.slots[0]) if cache.slots else 0

    def forward(
        self, cache: ToyCache, inputs: StepInputs, sampling: Sampling, seed: int
    ) -> tuple[StepOutputs, ToyCache]:
        self.forward_calls += 1
        batch, width = inputs.token_ids.shape
        past = self.cache_length(cache)
        assert inputs.attention_mask.shape == (batch, past + width)
        tokens = np.zeros(inputs.read_index.shape, dtype=np.int64)
        confidences = np.zeros(inputs.read_index.shape, dtype=np.float64)
        for row in range(batch):
            new = [
                (int(p), int(t))
                for p, t in zip(inputs.position_ids[row], inputs.token_ids[row], strict=True)
            ]
            slots = cache.slots[row] + new
            for column, index in enumerate(inputs.read_index[row]):
                query = past + int(index)
                visible = [
                    slots[s] for s in range(query + 1) if inputs.attention_mask[row, s] or s == query
                ]
                tokens[row, column], confidences[row, column] = toy_output(
                    tuple(visible), self.vocab_size
                )
            cache.slots[row] = slots
        return StepOutputs(tokens=tokens, confidences=confidences), cache

    def crop(self, cache: ToyCache, length: int) -> ToyCache:
        return ToyCache(slots=[row[:length] for row in cache.slots])

    def reindex(
        self, cache: ToyCache, rows: np.ndarray, slots: np.ndarray | None
    ) -> ToyCache:
        picked = [cache.slots[int(r)] for r in rows]
        if slots is not None:
            self.compactions += 1
            picked = [[row[int(s)] for s in row_slots] for row, row_slots in zip(picked, slots, strict=True)]
        return ToyCache(slots=picked)


def toy_greedy(prompt: list[int], max_new_tokens: int, stop: frozenset[int], vocab_size: int) -> list[int]:
    """Plain one-token-at-a-time greedy decoding of the toy model, recomputed from scratch."""
    sequence = list(prompt)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token, _ = toy_output(tuple(enumerate(sequence)), vocab_size)
        generated.append(token)
        sequence.append(token)
        if token in stop:
            break
    return generated


def toy_mtp_reference(
    prompt: list[int], k: int, accept, max_new_tokens: int, stop: frozenset[int], mask: int, vocab_size: int
) -> list[int]:
    """Single-row MTP decoding by definition: context + (k-1) masks, recomputed from scratch."""
    sequence = list(prompt)
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        remaining = max_new_tokens - len(generated)
        num_masks = min(k - 1, remaining - 1)
        block = sequence + [mask] * num_masks
        outs = [toy_output(tuple(enumerate(block[: i + 1])), vocab_size) for i in range(len(sequence) - 1, len(block))]
        confidences = np.zeros((1, k))
        confidences[0, : len(outs)] = [c for _, c in outs]
        keep = min(int(accept(confidences)[0]), len(outs))
        chunk = [t for t, _ in outs[:keep]]
        for token in chunk:
            generated.append(token)
            sequence.append(token)
            if token in stop:
                return generated
    return generated
