"""The GPU check: what a session with a CUDA device runs first (under 8 minutes on one H100).

1. Decode equivalence on real-shaped random models: ``StaticK(1)`` and ``verify=True`` against
   transformers' greedy ``generate`` (batch of left-padded prompts), in float32 and bfloat16.
   float32 must match token for token (exit status 1 otherwise); bfloat16 is reported (a block
   of several tokens is computed with other kernels than one token, so bf16 rounding may flip a
   near-tie; ``StaticK(1)`` is the same computation and must match).
2. One training step (the packed student-forcing layout, hard-teacher loss) in float32 and under
   bf16 autocast on the device: both losses finite and within 2% of each other.
3. The cost of one forward of ``n = 1 .. 32`` new tokens on a warm 512-token cache for an
   8B-shaped Llama (random bf16 weights, transformers' ``DynamicCache``), as ``t(n) / t(1)``.

Run on a GPU:   python examples/gpu_check.py --device cuda [--out gpu-check.json]
Without ``--device cuda`` every part runs on tiny shapes on the CPU in seconds (what the test
suite does), to check the script itself; its timings then mean nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtp_core import ConfAdapt, StaticK
from mtp_torch import DistillConfig, MTPModel, distill, measure_cost_curve

# (hidden, layers, heads, kv_heads, intermediate, vocab)
SHAPES = {
    "llama-1b": (2048, 16, 32, 8, 8192, 128256),  # decode equivalence on the GPU
    "llama-8b": (4096, 32, 32, 8, 14336, 128256),  # the cost curve on the GPU
    "tiny": (64, 2, 4, 2, 128, 97),  # everything on the CPU
}


def random_llama(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama of one of ``SHAPES``, built directly on ``device``."""
    hidden, layers, heads, kv_heads, inner, vocab = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inner,
        max_position_embeddings=4096, eos_token_id=1, bos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def decode_equivalence(shape: str, device: str, new_tokens: int) -> dict[str, object]:
    """Part 1: exact-match of MTP decoding with greedy ``generate``, per dtype and mode."""
    results: dict[str, object] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = random_llama(shape, dtype, device)
        mtp = MTPModel(model)
        generator = torch.Generator().manual_seed(1)
        vocab = int(model.config.vocab_size) - 1  # the mask row is the last one
        ids = torch.randint(2, vocab, (4, 24), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :5] = mask[3, :11] = 0  # left padding
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            greedy = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=0,
            )  # fmt: skip
        for name, kwargs in {
            "static_1": {"policy": StaticK(1)},
            "verify_confadapt_0.9": {"policy": ConfAdapt(0.9, 4), "verify": True},
            "verify_static_4": {"policy": StaticK(4), "verify": True},
        }.items():
            out = mtp.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[], **kwargs
            )
            same = bool(torch.equal(out.sequences, greedy))
            results[f"{str(dtype).removeprefix('torch.')}/{name}"] = same
            print(f"  {str(dtype):15s} {name:22s} equals greedy: {same}")
        del model, mtp
    return results


def training_step(shape: str, device: str) -> dict[str, float]:
    """Part 2: one distillation step in float32 and under bf16 autocast, from the same weights."""
    losses: dict[str, float] = {}
    documents = torch.randint(2, SHAPES[shape][5] - 1, (8, 160), generator=torch.Generator())
    for bf16 in (False, True):
        model = random_llama(shape, torch.float32, device)
        cfg = DistillConfig(
            k_max=4, loss="hard", steps=1, lr=1e-5, batch_size=4, seq_len=160, seed=0,
            device=device, bf16=bf16, log_every=1, progress=False,
        )  # fmt: skip
        records: list[float] = []
        distill(model, documents.tolist(), cfg, on_step=lambda m, seen=records: seen.append(m.loss))
        losses["bf16" if bf16 else "float32"] = records[0]
        print(f"  one step, {'bf16 autocast' if bf16 else 'float32':13s} loss {records[0]:.4f}")
        del model
    return losses


def cost_table(shape: str, device: str, max_tokens: int, context: int) -> dict[int, float]:
    """Part 3: ``t(n) / t(1)`` of one forward of ``n`` new tokens on a warm cache."""
    model = random_llama(shape, torch.bfloat16 if device != "cpu" else torch.float32, device)
    curve = measure_cost_curve(model, max_tokens=max_tokens, context_length=context, repeats=5)
    seconds = curve.measured_seconds or curve.seconds  # the raw medians, not the envelope
    base = seconds[0]
    ratios = {n: s / base for n, s in zip(curve.num_tokens, seconds, strict=True)}
    print(f"  t(1) = {base * 1e3:.2f} ms")
    print("  n    " + " ".join(f"{n:>5d}" for n in ratios))
    print("  t/t1 " + " ".join(f"{r:5.2f}" for r in ratios.values()))
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cuda for the real check")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    on_gpu = args.device != "cpu"
    started = time.perf_counter()
    report: dict[str, object] = {"device": args.device}
    if on_gpu:
        report["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print("1. decode equivalence with greedy generate")
    report["decode"] = decode_equivalence("llama-1b" if on_gpu else "tiny", args.device, 64)
    print("2. one training step, float32 vs bf16 autocast")
    report["train_step"] = training_step("llama-1b" if on_gpu else "tiny", args.device)
    print("3. cost of one forward of n new tokens")
    report["cost_ratio"] = cost_table(
        "llama-8b" if on_gpu else "tiny", args.device, 32 if on_gpu else 8, 512 if on_gpu else 32
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    float32_ok = all(v for k, v in report["decode"].items() if k.startswith("float32"))  # type: ignore[union-attr]
    bf16_static_ok = bool(report["decode"]["bfloat16/static_1"])  # type: ignore[index]
    losses = report["train_step"]
    close = abs(losses["bf16"] - losses["float32"]) <= 0.02 * abs(losses["float32"])  # type: ignore[index]
    print(f"gpu check passed: {float32_ok and bf16_static_ok and close} ({report['seconds']} s)")
    return 0 if float32_ok and bf16_static_ok and close else 1


if __name__ == "__main__":
    raise SystemExit(main())
