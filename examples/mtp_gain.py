"""MTP's own gain: each decoding policy against one-token decoding of the same model and kernel.

`mtp bench` compares many methods at once; this prints the one comparison the gated default is
about, on prompts you choose: tokens per forward pass and wall-clock speed of lossless
verification (StaticK(k) drafts, the default policy's drafts) and of unverified ConfAdapt, each
against `StaticK(1)` of the same `MTPModel` (same kernel, same pass), in interleaved rounds
(median of the per-round ratios, with their range), and whether the output equals `StaticK(1)`'s.

Run:  python examples/mtp_gain.py            # 1 bundled held-out prompt, a quick look
      python examples/mtp_gain.py --prompts gsm8k/test.jsonl --skip 100 --num 6 \
          --new-tokens 96 --rounds 3     # what docs/results.md reports (~6 minutes)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtp_core import ConfAdapt, StaticK
from mtp_torch import MTPModel
from mtp_torch.bench.prompts import default_data_path, load_prompts


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mtp = MTPModel.from_pretrained(args.model, linear_kernel=args.kernel)
    path = args.prompts if args.prompts is not None else default_data_path()
    prompts = load_prompts(path, mtp.tokenizer, num_prompts=args.skip + args.num)[args.skip :]
    print(f"backend {type(mtp.decoding_backend()).__name__}, {mtp.kernel_plan().describe()}, "
          f"default policy {mtp.default_policy}, verify policy {mtp.verify_policy}")  # fmt: skip
    methods = [("static_1", StaticK(1), False)]
    methods += [(f"verify_static_{k}", StaticK(k), True) for k in (2, 3, 4)]
    methods += [("verify_default", mtp.default_policy, True)]
    methods += [(f"confadapt_0.9_k{k}", ConfAdapt(0.9, k), False) for k in (2, 4)]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    counts: dict[str, list[int]] = {name: [0, 0] for name, _, _ in methods}
    outputs: dict[str, list[list[int]]] = {name: [] for name, _, _ in methods}
    eos = mtp.tokenizer.eos_token_id
    warm = torch.tensor([list(prompts[0].input_ids)])
    for _, policy, verify in methods:  # untimed: first calls build the pass and its buffers
        mtp.generate(warm, policy=policy, verify=verify, max_new_tokens=4, eos_token_id=eos)
    for round_ in range(args.rounds):
        for name, policy, verify in methods:
            total = 0.0
            for prompt in prompts:
                ids = torch.tensor([list(prompt.input_ids)])
                start = time.perf_counter()
                out = mtp.generate(ids, policy=policy, verify=verify,
                                   max_new_tokens=args.new_tokens, eos_token_id=eos)  # fmt: skip
                total += time.perf_counter() - start
                if round_ == 0:
                    counts[name][0] += int(out.num_new_tokens.sum())
                    counts[name][1] += out.num_forward_passes
                    outputs[name].append(out.sequences[0].tolist())
            seconds[name].append(total)
    print("| policy | tok/fwd | seconds (median) | vs static_1 [range] | output = static_1 |")
    print("|---|---|---|---|---|")
    for name, _, _ in methods:
        ratios = [b / t for b, t in zip(seconds["static_1"], seconds[name], strict=True)]
        print(f"| {name} | {counts[name][0] / counts[name][1]:.3f} | "
              f"{statistics.median(seconds[name]):.2f} | {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}-{max(ratios):.2f}] | {outputs[name] == outputs['static_1']} |")  # fmt: skip
    lossless = all(outputs[name] == outputs["static_1"] for name, _, verify in methods if verify)
    print(f"\nverify=True gives StaticK(1)'s output with every policy: {lossless}")


if __name__ == "__main__":
    main()
