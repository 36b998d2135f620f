"""Tokens per pass of many decoding policies from one recording per prompt (mtp_core.replay).

Each prompt is decoded greedily once, one token a pass, every pass also feeding k - 1 masks
(``record_proposals``: the cost of one-token decoding).  The decode engine then replays each
policy against those recorded outputs (``replay``): lossless verification exactly as decoding
would go, ConfAdapt and unverified StaticK as an estimate once their text leaves the greedy one
(the table says how often it did).  So a threshold and k sweep, or a check of a new delta on
held-out prompts, costs one decode per prompt instead of one per policy.

It always decodes its first prompt with verified StaticK(3) drafts for real and checks that the
replay gave the same tokens and passes; ``--check`` also decodes a verify and a ConfAdapt policy
over every prompt and prints both figures.
``--curve`` times the decoding backend's passes of 1 real token and n - 1 masks (what a
ConfAdapt step of a mask-gated model runs) and predicts each policy's speed against one-token
decoding from its replayed pass widths.

``--judge LABEL`` is how a conversion's checkpoint is judged against the shipped one (the
held-out evaluations in docs/results.md): per subset of the prompts (``--subsets``) and over all
of them, verified StaticK(3) replayed (exact) and ConfAdapt(0.9, k) decoded for real; ``--log``
appends those figures as JSON lines (``docs/figures/gated_curve.py`` reads them).

Run:  python examples/replay_policies.py --prompts gsm8k/test.jsonl --skip 30 --num 60
      python examples/replay_policies.py --delta runs/gpu/default_delta.safetensors ...
      python examples/replay_policies.py                   # 2 bundled prompts, ~30 s
      python examples/replay_policies.py --prompts gsm8k/test.jsonl --num 90 --new-tokens 96 \
          --delta runs/run7/default_delta.safetensors --judge "run 7, step 1800" \
          --subsets 0:6,6:30,30:90 --log runs/run7-evals.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtp_core import ConfAdapt, StaticK, record_proposals, replay
from mtp_torch import MTPModel
from mtp_torch.bench.cost import measure_cost_curve
from mtp_torch.bench.prompts import default_data_path, load_prompts
from mtp_torch.weights.default import load_default_converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a model name or directory")
    parser.add_argument(
        "--delta", default=None, help="the default base with this delta file (not --model)"
    )
    parser.add_argument("--prompts", default=None, help="a .jsonl file (default: bundled set)")
    parser.add_argument("--skip", type=int, default=0, help="prompts to skip first")
    parser.add_argument("--num", type=int, default=2, help="prompts to record")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--k", type=int, default=4, help="positions per recorded pass")
    parser.add_argument("--kernel", default="native", help="linear_kernel (native: fused pass)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--check", action="store_true", help="also decode two policies for real")
    parser.add_argument("--curve", action="store_true", help="predict speed from a cost curve")
    parser.add_argument("--judge", default=None, metavar="LABEL", help="judge a checkpoint")
    parser.add_argument(
        "--subsets", default=None, help="with --judge: prompt ranges within --num, e.g. 0:6,6:30"
    )
    parser.add_argument("--log", default=None, help="with --judge: append JSON lines here")
    args = parser.parse_args()
    subsets = _subsets(args.subsets, args.num)
    torch.set_num_threads(args.threads)
    if args.delta is not None:
        model, tokenizer = load_default_converted(delta=args.delta)
        mtp = MTPModel(model, tokenizer=tokenizer, linear_kernel=args.kernel)
    else:
        mtp = MTPModel.from_pretrained(args.model, linear_kernel=args.kernel)
    if mtp.mask_token_id is None:
        raise SystemExit("the model has no mask token: convert it first (mtp convert)")
    path = args.prompts if args.prompts is not None else default_data_path()
    prompts = load_prompts(path, mtp.tokenizer, num_prompts=args.skip + args.num)[args.skip :]
    eos = mtp.tokenizer.eos_token_id
    stops = [] if eos is None else [int(eos)]
    backend = mtp.decoding_backend()
    start = time.perf_counter()
    tables = [
        record_proposals(
            backend,
            list(p.input_ids),
            mask_token_id=mtp.mask_token_id,
            k=args.k,
            max_new_tokens=args.new_tokens,
            stop_token_ids=stops,
        )  # fmt: skip
        for p in prompts
    ]
    recorded = sum(t.reference.shape[0] for t in tables)
    print(f"recorded {len(tables)} prompts, {recorded} tokens, k={args.k}, in "
          f"{time.perf_counter() - start:.0f} s ({type(backend).__name__})")  # fmt: skip
    policies = [(f"verify_static_{k}", StaticK(k), True) for k in range(2, args.k + 1)]
    policies += [(f"verify_confadapt_0.9_k{args.k}", ConfAdapt(0.9, args.k), True)]
    policies += [
        (f"confadapt_{t}_k{k}", ConfAdapt(t, k), False)
        for t in (0.99, 0.95, 0.9, 0.8, 0.6)
        for k in range(2, args.k + 1)
    ]
    relative = None
    if args.curve:
        curve = measure_cost_curve(
            mtp.model, max_tokens=2 * args.k - 1, backend=backend, mask_token_id=mtp.mask_token_id
        )
        one = curve.time(1)
        relative = {n: curve.time(n) / one for n in range(1, 2 * args.k)}
        print("pass cost, 1 real + n - 1 masks, t(n)/t(1): "
              + " ".join(f"{relative[n]:.2f}" for n in range(2, 2 * args.k)))  # fmt: skip
    header = "| policy | tokens/pass | exact | off greedy | mean width |"
    print(header + (" predicted vs StaticK(1) |" if relative else ""))
    print("|---|---|---|---|---|" + ("---|" if relative else ""))
    for name, policy, verify in policies:
        results = [replay(t, policy, verify=verify) for t in tables]
        new = sum(r.new_tokens for r in results)
        passes = sum(r.passes for r in results)
        widths = np.concatenate([r.widths[1:] for r in results])  # after the prompt's pass
        exact = np.mean([r.exact for r in results])
        off = sum(r.off_reference for r in results) / max(new, 1)
        row = f"| {name} | {new / passes:.3f} | {exact:.0%} | {off:.1%} | {widths.mean():.2f} |"
        if relative is not None:
            cost = sum(relative.get(int(w), relative[max(relative)]) for w in widths)
            steps = sum(r.new_tokens - 1 for r in results)  # StaticK(1)'s passes after the prompt
            row += f" {steps / cost:.2f}x |" if cost else " - |"
        print(row)
    first = torch.tensor([list(prompts[0].input_ids)])
    policy = StaticK(min(3, args.k))
    out = mtp.generate(first, policy=policy, verify=True, max_new_tokens=args.new_tokens,
                       eos_token_id=eos)  # fmt: skip
    replayed = replay(tables[0], policy, verify=True)
    same = (
        out.sequences[0, first.shape[1] :].tolist() == replayed.decode.tokens[0].tolist()
        and out.num_forward_passes == replayed.passes
    )
    print(f"replayed verification is the decode (tokens and passes): {same}")
    if args.check:
        checked = {f"verify_static_{min(3, args.k)}", f"confadapt_0.9_k{args.k}"}
        for name, policy, verify in [p for p in policies if p[0] in checked]:
            new = passes = 0
            for p in prompts:
                out = mtp.generate(torch.tensor([list(p.input_ids)]), policy=policy, verify=verify,
                                   max_new_tokens=args.new_tokens, eos_token_id=eos)  # fmt: skip
                new += int(out.num_new_tokens.sum())
                passes += out.num_forward_passes
            replayed = [replay(t, policy, verify=verify) for t in tables]
            estimate = sum(r.new_tokens for r in replayed) / sum(r.passes for r in replayed)
            print(f"check {name}: decoded {new / passes:.3f} tokens/pass, replayed {estimate:.3f}")
    if args.judge is not None:
        _judge(mtp, prompts, tables, args, subsets, Path(path).stem)


def _subsets(text: str | None, num: int) -> list[tuple[int, int]]:
    """``"0:6,6:30"`` as ranges of the recorded prompts, checked against ``--num``."""
    if text is None:
        return []
    ranges = []
    for part in text.split(","):
        start, _, stop = part.partition(":")
        try:
            first, last = int(start), int(stop)
        except ValueError:
            raise SystemExit(f"--subsets: {part!r} is not START:STOP (e.g. 0:6,6:30)") from None
        if not 0 <= first < last <= num:
            raise SystemExit(f"--subsets: {part!r} must lie within the {num} recorded prompts")
        ranges.append((first, last))
    return ranges


def _judge(
    mtp: MTPModel,
    prompts: list[Any],
    tables: list[Any],
    args: argparse.Namespace,
    subsets: list[tuple[int, int]],
    name: str,
) -> None:
    """Per subset and overall: ConfAdapt(0.9, k) decoded, verified StaticK(3) replayed."""
    eos = mtp.tokenizer.eos_token_id
    verify = StaticK(min(3, args.k))
    decoded = []  # (new tokens, passes) per prompt
    for p in prompts:
        out = mtp.generate(torch.tensor([list(p.input_ids)]), policy=ConfAdapt(0.9, args.k),
                           max_new_tokens=args.new_tokens, eos_token_id=eos)  # fmt: skip
        decoded.append((int(out.num_new_tokens.sum()), out.num_forward_passes))
    replayed = [replay(t, verify, verify=True) for t in tables]
    lines = []
    for first, last in [*subsets, (0, len(prompts))]:
        new = sum(n for n, _ in decoded[first:last])
        passes = sum(n for _, n in decoded[first:last])
        line = {
            "checkpoint": args.judge,
            "prompts": f"{name}[{args.skip + first}:{args.skip + last}]",
            f"confadapt_0.9_k{args.k}": round(new / passes, 4),
            f"verify_static_{verify.k}": round(
                sum(r.new_tokens for r in replayed[first:last])
                / sum(r.passes for r in replayed[first:last]),
                4,
            ),
            "how": "ConfAdapt decoded; verify replayed (exact)",
        }
        print("judge " + json.dumps(line))
        lines.append(line)
    if args.log is not None:
        with open(args.log, "a", encoding="utf-8") as log:
            log.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
