"""The passes MTP decoding really runs, timed against a one-token pass in the same loop.

A decoding step of a policy with k positions feeds a row's pending tokens and k - 1 mask tokens
and reads the last pending row and the mask rows.  This times such passes through the backend
`generate` uses (the fused pass with `--kernel native`), after a cached context, cycling through
every shape once per iteration so that a machine whose speed drifts (a shared VM) moves every
shape alike; it prints each median against the one-token pass.  On a mask-gated model the
mask rows also run the gate's adapters.

With ``--packed`` it times the same passes twice in each cycle, reading the weights in float32
and in packed form (``mtp_torch.decoding.packing``: a model dequantized from a Q4_1/Q8_0 GGUF
file, as the default is, read in 4-8 bits), checks that both give the same tokens and
confidences, and prints both tables and the packed pass's time over the float32 one.

Run:  python examples/pass_widths.py                     # a tiny random model, a quick look
      python examples/pass_widths.py --model default     # the shipped default (~1 minute)
      python examples/pass_widths.py --model default --packed   # float32 against packed
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtp_core import Sampling, StepInputs, StepOutputs
from mtp_torch import MTPModel
from mtp_torch.decoding.fused import FusedBackend
from mtp_torch.decoding.native import cpu_isa, cpu_model

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


def as_q4_1(model: torch.nn.Module) -> None:
    """Round every block weight to a Q4_1 code (``d * q + m`` per 32 values, d and m float16),
    as a model read from a Q4_1 GGUF file holds: the tiny model then packs like the default."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if not name.endswith("proj.weight"):
                continue
            blocks = weight.reshape(-1, 32)
            low = blocks.amin(dim=1, keepdim=True).half().float()
            step = ((blocks.amax(dim=1, keepdim=True) - low) / 15).half().float()
            levels = torch.round((blocks - low) / step).clamp(0, 15)
            weight.copy_((step * levels + low).reshape(weight.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model name or directory (default: tiny)")
    parser.add_argument("--kernel", default="native", help="linear_kernel (native: fused pass)")
    parser.add_argument("--context", type=int, default=200, help="cached tokens before a pass")
    parser.add_argument("--iterations", type=int, default=40, help="timed cycles over the shapes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--packed", action="store_true", help="also time the passes over packed weights"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        model = tiny_model()
        if args.packed:
            as_q4_1(model)
        mtp = MTPModel(model, linear_kernel=args.kernel)
    else:
        mtp = MTPModel.from_pretrained(args.model, linear_kernel=args.kernel)
    backends = {"float32": mtp.decoding_backend()}
    if args.packed:
        if not isinstance(backends["float32"], FusedBackend):
            parser.error("--packed needs the fused pass (--kernel native on a Llama model)")
        plan = mtp.kernel_plan()
        backends = {
            "float32": FusedBackend(mtp.model, plan, packed_weights=False),
            "packed": FusedBackend(mtp.model, plan, packed_weights=True),
        }
        if not backends["packed"]._weights.packed:
            print("no weight of this model packs (not a Q4_1/Q8_0 dequantization)")
    first = next(iter(backends.values()))
    print(f"CPU: {cpu_model()} ({' '.join(cpu_isa())}); backend {type(first).__name__}")
    rng = np.random.default_rng(0)
    vocab = int(mtp.model.get_input_embeddings().weight.shape[0]) - 1
    caches = {name: backend.new_cache(1) for name, backend in backends.items()}

    def step(name: str, ids: np.ndarray, past: int, read: list[int]) -> StepOutputs:
        width = ids.shape[1]
        inputs = StepInputs(
            token_ids=ids,
            position_ids=np.arange(past, past + width, dtype=np.int64)[None, :],
            attention_mask=np.ones((1, past + width), dtype=bool),
            read_index=np.asarray(read, dtype=np.int64)[None, :],
        )
        out, caches[name] = backends[name].forward(caches[name], inputs, Sampling(), 0)
        return out

    prompt = rng.integers(1, vocab, (1, args.context))
    for name in backends:
        step(name, prompt, 0, [args.context - 1])
    blocks = []
    for pending, masks in SHAPES:
        ids = rng.integers(1, vocab, (1, pending + masks))
        ids[0, pending:] = mtp.mask_token_id
        blocks.append((ids, list(range(pending - 1, pending + masks))))
    times = {name: [[] for _ in SHAPES] for name in backends}
    same = True
    for iteration in range(args.iterations + 2):  # two untimed warm-up cycles
        for index, (ids, read) in enumerate(blocks):
            outs = []
            for name, backend in backends.items():
                start = time.perf_counter()
                outs.append(step(name, ids, args.context, read))
                elapsed = time.perf_counter() - start
                caches[name] = backend.crop(caches[name], args.context)
                if iteration >= 2:
                    times[name][index].append(elapsed)
            same = same and all(
                np.array_equal(out.tokens, outs[0].tokens)
                and np.array_equal(out.confidences, outs[0].confidences)
                for out in outs[1:]
            )
    for name in backends:
        one = float(np.median(times[name][0]))
        label = f"{name} weights: " if args.packed else ""
        print(f"{label}one-token pass: {one * 1e3:.1f} ms (median of {args.iterations})")
        print("| pending | masks | width | t / t(1) |\n|---|---|---|---|")
        for (pending, masks), samples in zip(SHAPES, times[name], strict=True):
            ratio = float(np.median(samples)) / one
            print(f"| {pending} | {masks} | {pending + masks} | {ratio:.2f} |")
    if args.packed:
        print("packed pass / float32 pass, same shape (same tokens and confidences: " f"{same}):")
        for index, (pending, masks) in enumerate(SHAPES):
            ratio = float(np.median(times["packed"][index]) / np.median(times["float32"][index]))
            print(f"  {pending}+{masks}: {ratio:.2f}")
    print("pass widths timed: True")


if __name__ == "__main__":
    main()
