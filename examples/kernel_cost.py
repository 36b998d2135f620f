"""The cost of a decoding pass of n tokens, per Linear kernel, and what it buys MTP.

MTP can only pay where a pass of several tokens costs about what a pass of one does.  This
benchmark prints, side by side for every kernel (``stock``, ``skinny``, ``native``, ``auto``):

1. the cost curve t(n)/t(1) of one forward pass of ``n`` new tokens after a warm cache, timed
   through the backend ``generate`` runs with that kernel (transformers' forward, or the fused
   one-call pass of ``mtp_torch.decoding.fused`` for ``native``/``auto`` on Llama models;
   ``measure_cost_curve``, median of ``--repeats``), and t(1) itself;
2. decoding the same prompt through ``MTPModel.generate``: seconds per forward pass of
   ``StaticK(4)`` over ``StaticK(1)`` (a StaticK(4) pass feeds 4 pending tokens + 3 masks), and
   ``StaticK(1)``'s tokens per second over transformers' greedy ``generate`` with the same kernel,
   the same weights, measured in the same run (interleaved, median of ``--rounds``);
3. whether each kernel gives transformers' greedy tokens with ``StaticK(1)``.

It also prints the CPU's model and ISA flags: the figures depend on them (docs/results.md).

Run:  python examples/kernel_cost.py                          # a tiny random model, seconds
      python examples/kernel_cost.py --model default-base     # the embedded default, ~3 minutes
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtp_torch import MTPModel, StaticK, measure_cost_curve, use_kernels
from mtp_torch.decoding.native import ISA_FLAGS, cpu_isa, cpu_model

KERNELS = ("stock", "skinny", "native", "auto")


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
    model.generation_config.eos_token_id = None
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model name or directory (default: tiny)")
    parser.add_argument("--max-tokens", type=int, default=8, help="widest pass timed")
    parser.add_argument("--context", type=int, default=200, help="cached tokens before the pass")
    parser.add_argument("--repeats", type=int, default=9, help="timed passes per width")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved decoding rounds")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_model() if args.model is None else MTPModel.from_pretrained(args.model).model
    model.generation_config.eos_token_id = None  # every round decodes the full budget
    print(f"CPU: {cpu_model()}; ISA: {' '.join(cpu_isa()) or 'none of ' + ', '.join(ISA_FLAGS)}")

    wrappers = {
        kernel: MTPModel(model, mask_token_id=None, linear_kernel=kernel) for kernel in KERNELS
    }
    plans = {kernel: wrapper.kernel_plan() for kernel, wrapper in wrappers.items()}
    for kernel, plan in plans.items():
        print(f"  {kernel:6s} -> {plan.describe()}")

    # 1. The cost curve per kernel.
    timing = dict(max_tokens=args.max_tokens, context_length=args.context, repeats=args.repeats)
    curves = {}
    passes = {}
    for kernel, plan in plans.items():
        backend = wrappers[kernel].decoding_backend(plan)  # the pass generate runs (fused or not)
        passes[kernel] = "fused" if type(backend).__name__ == "FusedBackend" else "transformers"
        with use_kernels(plan, model):
            curve = measure_cost_curve(model, backend=backend, **timing)
        curves[kernel] = [s * 1e3 for s in curve.measured_seconds]
    print(f"\none forward pass after {args.context} cached tokens, {args.threads} threads: "
          "t(1) in ms, then t(n)/t(1)")  # fmt: skip
    widths = " | ".join(f"n={n}" for n in range(2, args.max_tokens + 1))
    print(f"| kernel | pass | t(1) ms | {widths} |")
    print("|---|---|---|" + "---|" * (args.max_tokens - 1))
    for kernel, ms in curves.items():
        ratios = " | ".join(f"{t / ms[0]:.2f}" for t in ms[1:])
        print(f"| {kernel} | {passes[kernel]} | {ms[0]:.1f} | {ratios} |")

    # 2. Decoding: StaticK(4) vs StaticK(1) per pass, StaticK(1) vs transformers' generate.
    prompt = torch.randint(10, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    samples: dict[str, dict[str, list[float]]] = {
        k: {"s1": [], "s4": [], "hf": []} for k in KERNELS
    }
    same: dict[str, bool] = {}
    for _ in range(args.rounds):
        for kernel, mtp in wrappers.items():
            one = mtp.generate(prompt, policy=StaticK(1), max_new_tokens=n)
            four = mtp.generate(prompt, policy=StaticK(4), max_new_tokens=n)
            with torch.no_grad(), use_kernels(plans[kernel], model):
                start = time.perf_counter()
                greedy = model.generate(prompt, do_sample=False, max_new_tokens=n)
                hf_seconds = time.perf_counter() - start
            samples[kernel]["s1"].append(one.elapsed_s / one.num_forward_passes)
            samples[kernel]["s4"].append(four.elapsed_s / four.num_forward_passes)
            samples[kernel]["hf"].append(hf_seconds / one.elapsed_s)  # StaticK(1) tok/s over hf's
            same[kernel] = same.get(kernel, True) and torch.equal(one.sequences, greedy)
    print(f"\nMTPModel.generate, {n} new tokens, median of {args.rounds} interleaved rounds")
    print("| kernel | StaticK(1) ms/pass | StaticK(4) ms/pass | StaticK(4)/StaticK(1) per pass "
          "| StaticK(1) tok/s / generate tok/s | StaticK(1) == generate |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for kernel, s in samples.items():
        s1, s4 = statistics.median(s["s1"]), statistics.median(s["s4"])
        print(f"| {kernel} | {s1 * 1e3:.1f} | {s4 * 1e3:.1f} | {s4 / s1:.2f} | "
              f"{statistics.median(s['hf']):.2f} | {same[kernel]} |")  # fmt: skip

    print(f"\nStaticK(1) gives transformers' greedy tokens with every kernel: {all(same.values())}")


if __name__ == "__main__":
    main()
