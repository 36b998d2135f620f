"""MTP's own gain: each decoding policy against one-token decoding of the same model and kernel.

`mtp bench` compares many methods at once; this prints the one comparison the gated default is
about, on prompts you choose: tokens per forward pass and wall-clock speed of lossless
verification (StaticK(k) drafts, the default policy's drafts) and of unverified ConfAdapt, each
against `StaticK(1)` of the same `MTPModel` (same kernel, same pass), in interleaved rounds
(median of the per-round ratios, with their range), and whether the output equals `StaticK(1)`'s.
It also prints what a pass costs: seconds per forward pass of unverified `StaticK(4)` (4 pending
tokens and 3 masks a pass) against `StaticK(1)`'s, and `StaticK(1)` against transformers' greedy
`generate` on the same weights, timed in the same rounds.

Run:  python examples/mtp_gain.py            # 1 bundled held-out prompt, a quick look
      python examples/mtp_gain.py --prompts gsm8k/test.jsonl --skip 100 --num 6 \
          --new-tokens 96 --rounds 3     # what docs/results.md reports (~6 minutes)
      python examples/mtp_gain.py --delta runs/gpu/default_delta.safetensors ...
                                         # a candidate delta (e.g. from a GPU run) instead
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtp_core import ConfAdapt, StaticK
from mtp_torch import MTPModel
from mtp_torch.bench.prompts import default_data_path, load_prompts
from mtp_torch.weights.default import load_default_converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a model name or directory")
    parser.add_argument("--prompts", default=None, help="a .jsonl file (default: bundled set)")
    parser.add_argument("--skip", type=int, default=0, help="prompts to skip first")
    parser.add_argument("--num", type=int, default=1, help="prompts to decode")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per prompt")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timed rounds")
    parser.add_argument("--kernel", default="native", help="linear_kernel (native: fused pass)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--delta", default=None, help="the default base with this delta file (not --model)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.delta is not None:
        model, tokenizer = load_default_converted(delta=args.delta)
        mtp = MTPModel(model, tokenizer=tokenizer, linear_kernel=args.kernel)
    else:
        mtp = MTPModel.from_pretrained(args.model, linear_kernel=args.kernel)
    path = args.prompts if args.prompts is not None else default_data_path()
    prompts = load_prompts(path, mtp.tokenizer, num_prompts=args.skip + args.num)[args.skip :]
    print(f"backend {type(mtp.decoding_backend()).__name__}, {mtp.kernel_plan().describe()}, "
          f"default policy {mtp.default_policy}, verify policy {mtp.verify_policy}")  # fmt: skip
    methods = [("static_1", StaticK(1), False)]
    methods += [(f"verify_static_{k}", StaticK(k), True) for k in (2, 3, 4)]
    methods += [("verify_default", mtp.default_policy, True)]
    methods += [(f"confadapt_0.9_k{k}", ConfAdapt(0.9, k), False) for k in (2, 4)]
    methods += [("static_4", StaticK(4), False), ("generate", None, False)]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    after_prompt: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    counts: dict[str, list[int]] = {name: [0, 0] for name, _, _ in methods}
    outputs: dict[str, list[list[int]]] = {name: [] for name, _, _ in methods}
    eos = mtp.tokenizer.eos_token_id
    warm = torch.tensor([list(prompts[0].input_ids)])

    def decode(
        ids: torch.Tensor, policy: object, verify: bool, new_tokens: int
    ) -> tuple[int, int, list[int], float]:
        """(new tokens, forward passes, sequence, seconds of the prompt's pass);
        ``policy=None``: transformers' generate (whose prompt's pass is not timed apart)."""
        if policy is None:
            with torch.no_grad():
                out = mtp.model.generate(ids, do_sample=False, max_new_tokens=new_tokens,
                                         eos_token_id=eos, pad_token_id=eos)  # fmt: skip
            return (
                int(out.shape[1] - ids.shape[1]),
                int(out.shape[1] - ids.shape[1]),
                out[0].tolist(),
                0.0,
            )
        result = mtp.generate(ids, policy=policy, verify=verify, max_new_tokens=new_tokens,
                              eos_token_id=eos)  # fmt: skip
        return (
            int(result.num_new_tokens.sum()),
            result.num_forward_passes,
            result.sequences[0].tolist(),
            result.first_pass_s,
        )

    for _, policy, verify in methods:  # untimed: first calls build the pass and its buffers
        decode(warm, policy, verify, 4)
    for round_ in range(args.rounds):
        for name, policy, verify in methods:
            total = prompt_passes = 0.0
            for prompt in prompts:
                ids = torch.tensor([list(prompt.input_ids)])
                start = time.perf_counter()
                new, passes, sequence, first = decode(ids, policy, verify, args.new_tokens)
                total += time.perf_counter() - start
                prompt_passes += first
                if round_ == 0:
                    counts[name][0] += new
                    counts[name][1] += passes
                    outputs[name].append(sequence)
            seconds[name].append(total)
            after_prompt[name].append(total - prompt_passes)
    print(
        f"{len(prompts)} prompts x {args.new_tokens} new tokens, {args.rounds} interleaved rounds\n"
    )
    print("| policy | tok/fwd | seconds (median) | vs static_1 [range] | output = static_1 |")
    print("|---|---|---|---|---|")
    for name, _, _ in methods:
        ratios = [b / t for b, t in zip(seconds["static_1"], seconds[name], strict=True)]
        print(f"| {name} | {counts[name][0] / counts[name][1]:.3f} | "
              f"{statistics.median(seconds[name]):.2f} | {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}-{max(ratios):.2f}] | {outputs[name] == outputs['static_1']} |")  # fmt: skip
    # Per pass after the prompt's: a prompt's pass costs many one-token passes, and StaticK(4)
    # spreads it over a quarter of StaticK(1)'s passes, so whole-call seconds per pass mix the
    # prompt's length into the ratio.  Both are shown.
    for label, table, prompt_pass in (
        ("after the prompt's pass", after_prompt, 1),
        ("whole calls", seconds, 0),
    ):
        per_pass = {
            name: [t / (counts[name][1] - prompt_pass * len(prompts)) for t in table[name]]
            for name in ("static_1", "static_4")
        }
        cost = [
            four / one for one, four in zip(per_pass["static_1"], per_pass["static_4"], strict=True)
        ]
        print(f"StaticK(4) seconds per pass / StaticK(1)'s, {label}: {statistics.median(cost):.2f} "
              f"[{min(cost):.2f}-{max(cost):.2f}] ({statistics.median(per_pass['static_4']) * 1e3:.1f} "
              f"against {statistics.median(per_pass['static_1']) * 1e3:.1f} ms)")  # fmt: skip
    versus = [g / one for one, g in zip(seconds["static_1"], seconds["generate"], strict=True)]
    print(f"StaticK(1) speed / transformers' greedy generate's (same weights, same tokens: "
          f"{outputs['generate'] == outputs['static_1']}): {statistics.median(versus):.2f} "
          f"[{min(versus):.2f}-{max(versus):.2f}]")  # fmt: skip
    lossless = all(outputs[name] == outputs["static_1"] for name, _, verify in methods if verify)
    print(f"\nverify=True gives StaticK(1)'s output with every policy: {lossless}")


if __name__ == "__main__":
    main()
