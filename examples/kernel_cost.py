"""Time a decoding pass with PyTorch's stock Linear kernel and with ``skinny_linear``.

Decoding at batch 1 feeds a few tokens per forward pass, so its cost is set by how fast each
``nn.Linear`` multiplies a few rows by its weight.  This script measures the cost curve (median
time of one pass of ``n`` new tokens after a warm cache, ``measure_cost_curve``) twice, once
with the stock kernel and once inside ``skinny_linear`` (the weight-first product), checks that
both kernels give the same greedy tokens, and prints the two curves side by side.  Whether the
kernel pays depends on the CPU's BLAS; docs/results.md has the figures of the development
machine (SmolLM2-135M, 2 cores).

Run:  python examples/kernel_cost.py                          # a tiny random model, seconds
      python examples/kernel_cost.py --model default-base     # the embedded default, ~1 minute
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtp_torch import MTPModel, measure_cost_curve, skinny_linear


def tiny_model() -> LlamaForCausalLM:
    """A random 4-layer Llama, big enough for its matrix products to show up in the time."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.3,  # peaked outputs: no near-ties for the kernels to split
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model name or directory (default: tiny)")
    parser.add_argument("--max-tokens", type=int, default=8, help="widest pass timed")
    parser.add_argument("--context", type=int, default=200, help="cached tokens before the pass")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per width")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_model() if args.model is None else MTPModel.from_pretrained(args.model).model

    prompt = torch.randint(10, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock_tokens = model.generate(prompt, do_sample=False, max_new_tokens=16)
        with skinny_linear(model):
            skinny_tokens = model.generate(prompt, do_sample=False, max_new_tokens=16)
    same = bool(torch.equal(stock_tokens, skinny_tokens))

    timing = dict(max_tokens=args.max_tokens, context_length=args.context, repeats=args.repeats)
    stock = measure_cost_curve(model, **timing)
    with skinny_linear(model):
        skinny = measure_cost_curve(model, **timing)

    print(f"one forward pass after {args.context} cached tokens, {args.threads} threads (ms)")
    print("| n | stock | skinny | stock / skinny | stock n / stock 1 | skinny n / skinny 1 |")
    print("|---|---|---|---|---|---|")
    stock_ms = [s * 1e3 for s in stock.measured_seconds]
    skinny_ms = [s * 1e3 for s in skinny.measured_seconds]
    for n, a, b in zip(stock.num_tokens, stock_ms, skinny_ms, strict=True):
        print(
            f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f} | {a / stock_ms[0]:.2f} | "
            f"{b / skinny_ms[0]:.2f} |"
        )
    print(f"same greedy tokens with both kernels: {same}")


if __name__ == "__main__":
    main()
