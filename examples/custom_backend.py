"""A custom backend in a few dozen lines: a bigram model that predicts several tokens ahead.

Any object with the five methods of ``mtp_core.Backend`` (``new_cache``, ``cache_length``,
``forward``, ``crop``, ``reindex``) can be driven by the decode engine ``mtp_core.decode``.
Here the "model" is a table of bigram probabilities counted from a tiny corpus, in pure
Python + numpy.  At a slot holding the ``<mask>`` token it looks back past the masks to the last
real token and follows the bigram chain one hop per mask, so it is a (very small) multi-token
predictor: with ``k - 1`` masks it proposes ``k`` tokens in one forward pass.

The cache is just the list of (visible) token ids per row; ``attention_mask`` from the engine
says which cached slots a row may see (rows that accepted fewer tokens than others own holes).

Run:  python examples/custom_backend.py
"""

from __future__ import annotations

import numpy as np

import mtp_core
from mtp_core import ConfAdapt, Sampling, StaticK, StepInputs, StepOutputs

Cache = list[list[int]]  # per row, the token id held by each cache slot


class BigramBackend:
    """A bigram "language model" implementing ``mtp_core.Backend`` (greedy only)."""

    def __init__(self, corpus: list[list[int]], vocab_size: int, mask_token_id: int) -> None:
        counts = np.full((vocab_size, vocab_size), 0.01)  # smoothed bigram counts
        for sentence in corpus:
            for previous, following in zip(sentence[:-1], sentence[1:], strict=True):
                counts[previous, following] += 1.0
        self.probs = counts / counts.sum(axis=1, keepdims=True)
        self.mask_token_id = mask_token_id

    def new_cache(self, batch_size: int) -> Cache:
        return [[] for _ in range(batch_size)]

    def cache_length(self, cache: Cache) -> int:
        return len(cache[0]) if cache else 0

    def forward(
        self, cache: Cache, inputs: StepInputs, sampling: Sampling, seed: int
    ) -> tuple[StepOutputs, Cache]:
        if not sampling.greedy:
            raise ValueError("BigramBackend decodes greedily only; pass Sampling() (temperature 0)")
        past = self.cache_length(cache)
        tokens = np.zeros(inputs.read_index.shape, dtype=np.int64)
        confidences = np.zeros(inputs.read_index.shape, dtype=np.float64)
        for row, slots in enumerate(cache):
            slots.extend(int(t) for t in inputs.token_ids[row])
            for column, index in enumerate(inputs.read_index[row]):
                query = past + int(index)
                seen = [slots[s] for s in range(query + 1) if inputs.attention_mask[row, s]]
                hops = 1
                while seen[-1] == self.mask_token_id:  # one bigram hop per mask
                    seen.pop()
                    hops += 1
                token, confidence = seen[-1], 1.0
                for _ in range(hops):
                    confidence *= float(self.probs[token].max())
                    token = int(self.probs[token].argmax())
                tokens[row, column], confidences[row, column] = token, confidence
        return StepOutputs(tokens=tokens, confidences=confidences), cache

    def crop(self, cache: Cache, length: int) -> Cache:
        return [slots[:length] for slots in cache]

    def reindex(self, cache: Cache, rows: np.ndarray, slots: np.ndarray | None) -> Cache:
        kept = [cache[int(r)] for r in rows]
        if slots is None:
            return [list(row) for row in kept]
        return [[row[int(s)] for s in picks] for row, picks in zip(kept, slots, strict=True)]


def main() -> None:
    words = "<mask> the cat sat on a mat . dog ran in big park".split()
    ids = {word: i for i, word in enumerate(words)}
    sentences = ("the cat sat on a mat .", "the cat sat on a mat .", "the dog ran in a big park .")
    corpus = [[ids[w] for w in s.split()] for s in sentences]

    # 1. Register it under a name (a package would use the "mtp_core.backends" entry point).
    mtp_core.register_backend("bigram", f"{__name__}:BigramBackend")
    backend_class = mtp_core.load_backend("bigram")
    backend = backend_class(corpus, vocab_size=len(words), mask_token_id=ids["<mask>"])
    print("registered backends:", mtp_core.available_backends())

    # 2. Decode with the shared engine: static k = 1 (plain greedy) against ConfAdapt.
    prompts = [[ids["the"], ids["dog"]], [ids["the"]]]
    settings = dict(mask_token_id=ids["<mask>"], max_new_tokens=12, stop_token_ids=[ids["."]])
    greedy = mtp_core.decode(backend, prompts, StaticK(1), **settings)
    adaptive = mtp_core.decode(backend, prompts, ConfAdapt(threshold=0.5, k_max=4), **settings)
    lossless = mtp_core.decode(
        backend, prompts, ConfAdapt(threshold=0.5, k_max=4), verify=True, **settings
    )
    for row, prompt in enumerate(prompts):
        text = " ".join(words[t] for t in [*prompt, *adaptive.tokens[row]])
        print(f"row {row}: {text!r}")
    print(
        f"greedy: {greedy.num_forward_passes} passes; ConfAdapt: {adaptive.num_forward_passes} "
        f"passes ({adaptive.tokens_per_forward:.2f} tokens/forward)"
    )

    # 3. The lossless mode reproduces greedy decoding exactly, on any backend.
    for row in range(len(prompts)):
        assert lossless.tokens[row].tolist() == greedy.tokens[row].tolist()
    print(f"verify=True equals greedy in {lossless.num_forward_passes} passes")


if __name__ == "__main__":
    main()
