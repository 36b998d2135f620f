"""Decode a prompt with an MTP model, several tokens per forward pass."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import TextStreamer

from mtp_torch.cli.options import check_device, check_sampling, check_text, parse_policy
from mtp_torch.decoding.kernels import LINEAR_KERNELS
from mtp_torch.decoding.model import MTPModel
from mtp_torch.dtypes import parse_dtype
from mtp_torch.text import encode_prompt
from mtp_torch.weights.default import DEFAULT_MODEL_NAME

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``mtp generate`` options on ``parser``."""
    parser.add_argument(
        "--model",
        default="default",
        help="converted checkpoint directory, plain model directory, 'default' (the embedded "
        f"default, {DEFAULT_MODEL_NAME}, converted) or 'default-base' (unconverted)",
    )
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed the prompt as is instead of through the tokenizer's chat template",
    )
    parser.add_argument(
        "--policy",
        default=None,
        help="confadapt[:THRESHOLD[:K_MAX]] or static:K (default: the model's stored ConfAdapt)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--verify",
        action="store_true",
        help="lossless mode: the output equals greedy decoding exactly",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object with stats")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument(
        "--kernel",
        choices=list(LINEAR_KERNELS),
        default="auto",
        help="CPU Linear kernel: 'auto' (default: the fastest per pass width, measured once on "
        "this machine and cached), 'native', 'skinny', or 'stock' (PyTorch's own products: "
        "transformers' exact numerics; the others agree to rounding)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="decode on a registered backend (a plug-in's 'mtp_core.backends' entry point; "
        "see mtp_core.available_backends()); default: the built-in one",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``mtp generate``; print the text (streamed) or, with ``--json``, one JSON object."""
    if args.policy is not None:
        parse_policy(args.policy)  # a malformed spec fails before the model loads
    check_text("--prompt", args.prompt)
    check_sampling(args.temperature, args.top_p, args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    # The CPU kernels are for the CPU; elsewhere PyTorch's own products run.
    kernel = args.kernel if str(device).startswith("cpu") else "stock"
    mtp = MTPModel.from_pretrained(
        args.model,
        dtype=parse_dtype(args.dtype),
        device=device,
        linear_kernel=kernel,
        backend=args.backend,
    )
    policy = parse_policy(args.policy, mtp.default_policy) if args.policy is not None else None
    tokenizer = mtp.tokenizer
    if tokenizer is None:
        raise ValueError(
            f"{args.model} has no tokenizer; save one with the model to use `mtp generate`"
        )
    prompt_ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat_template)
    input_ids = torch.tensor([prompt_ids], device=device)

    # The text streams through transformers' own TextStreamer (it ends with a newline).
    streamer = (
        None if args.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    )
    out = mtp.generate(
        input_ids,
        policy=policy,
        max_new_tokens=args.max_new_tokens,
        verify=args.verify,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        streamer=streamer,
    )
    count = int(out.num_new_tokens[0])
    token_ids = out.sequences[0, input_ids.shape[1] : input_ids.shape[1] + count].tolist()
    seconds = float(out.elapsed_s)
    rate = count / seconds if seconds > 0 else 0.0
    if args.json:
        record = {
            "text": tokenizer.decode(token_ids, skip_special_tokens=True),
            "tokens": count,
            "token_ids": token_ids,
            "tokens_per_forward": out.tokens_per_forward,
            "num_forward_passes": out.num_forward_passes,
            "seconds": seconds,
            "tokens_per_second": rate,
            "policy": repr(policy if policy is not None else mtp.default_policy),
        }
        print(json.dumps(record))
    else:
        print(
            f"{count} tokens in {seconds:.2f} s ({rate:.1f} tokens/s), "
            f"{out.tokens_per_forward:.2f} tokens per forward pass",
            file=sys.stderr,
        )
    return 0
