"""The passes MTP decoding really runs, timed against a one-token pass in the same loop.

A decoding step of a policy with k positions feeds a row's pending tokens and k - 1 mask tokens
and reads the last pending row and the mask rows.  This times such passes through the backend
`generate` uses (the fused pass with `--kernel native`), after a cached context, cycling through
every shape once per iteration so that a machine whose speed drifts (a shared VM) moves every
shape alike; it prints each median against the one-token pass.  On a mask-gated model the
mask rows also run the gate's adapters.

Run:  python examples/pass_widths.py                     # a tiny random model, a quick look
      python examples/pass_widths.py --model default     # the shipped default (~1 minute)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtp_core import Sampling, StepInputs
from mtp_torch import MTPModel
from mtp_torch.decoding.native import cpu_description

# (pending tokens, mask tokens): one-token decoding, then StaticK(2) and StaticK(4) steps (also
# the verify passes of 1-3 drafts), and the same widths without mask rows.
SHAPES = [(1, 0), (2, 1), (3, 2), (4, 3), (3, 0), (5, 0), (7, 0)]


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model name or directory (default: tiny)")
    parser.add_argument("--kernel", default="native", help="linear_kernel (native: fused pass)")
    parser.add_argument("--context", type=int, default=200, help="cached tokens before a pass")
    parser.add_argument("--iterations", type=int, default=40, help="timed cycles over the shapes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        mtp = MTPModel(tiny_model(), linear_kernel=args.kernel)
    else:
        mtp = MTPModel.from_pretrained(args.model, linear_kernel=args.kernel)
    backend = mtp.decoding_backend()
    print(f"CPU: {cpu_description().split('|')[0].strip()}; backend {type(backend).__name__}")
    rng = np.random.default_rng(0)
    vocab = int(mtp.model.get_input_embeddings().weight.shape[0]) - 1
    state = {"cache": backend.new_cache(1)}

    def step(ids: np.ndarray, past: int, read: list[int]) -> None:
        width = ids.shape[1]
        inputs = StepInputs(
            token_ids=ids,
            position_ids=np.arange(past, past + width, dtype=np.int64)[None, :],
            attention_mask=np.ones((1, past + width), dtype=bool),
            read_index=np.asarray(read, dtype=np.int64)[None, :],
        )
        _, state["cache"] = backend.forward(state["cache"], inputs, Sampling(), 0)

    step(rng.integers(1, vocab, (1, args.context)), 0, [args.context - 1])
    blocks = []
    for pending, masks in SHAPES:
        ids = rng.integers(1, vocab, (1, pending + masks))
        ids[0, pending:] = mtp.mask_token_id
        blocks.append((ids, list(range(pending - 1, pending + masks))))
    times: list[list[float]] = [[] for _ in SHAPES]
    for iteration in range(args.iterations + 2):  # two untimed warm-up cycles
        for index, (ids, read) in enumerate(blocks):
            start = time.perf_counter()
            step(ids, args.context, read)
            elapsed = time.perf_counter() - start
            state["cache"] = backend.crop(state["cache"], args.context)
            if iteration >= 2:
                times[index].append(elapsed)
    one = float(np.median(times[0]))
    print(f"one-token pass: {one * 1e3:.1f} ms (median of {args.iterations})")
    print("| pending | masks | width | t / t(1) |\n|---|---|---|---|")
    for (pending, masks), samples in zip(SHAPES, times, strict=True):
        ratio = float(np.median(samples)) / one
        print(f"| {pending} | {masks} | {pending + masks} | {ratio:.2f} |")
    print("pass widths timed: True")


if __name__ == "__main__":
    main()
