"""Distil a causal LM into a multi-token predictor (self-distillation, arXiv 2602.06019).

With no arguments, ``mtp convert`` converts the embedded default model (SmolLM2-135M-Instruct)
on a corpus the model writes itself (answers to seed prompts: ``--seed-prompts``, else
``$MTP_SEED_PROMPTS``, else the bundled sample of GSM8K train questions; once those run out,
prompts the model samples from its chat template) within a coffee-break time budget on
a CPU, using the settings of ``cpu_preset``.  Checkpoints go next to the output directory
(``<out>.ckpt``), so ``--resume`` continues a run that was stopped.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from mtp_core import ConfAdapt
from mtp_torch._resources import package_data
from mtp_torch.cli.options import ConfigOption, add_config_options, config_overrides
from mtp_torch.decoding.gated import gate_settings
from mtp_torch.decoding.saving import check_model_source
from mtp_torch.decoding.saving import foreign_files as _foreign_files
from mtp_torch.dtypes import parse_dtype
from mtp_torch.training.checkpoint import latest_checkpoint, read_checkpoint_state
from mtp_torch.training.config import DistillConfig, cpu_preset
from mtp_torch.training.corpus import GENERATE_BATCH_SIZE, read_seed_prompts, write_corpus
from mtp_torch.training.data import Example, load_examples
from mtp_torch.training.distill import distill
from mtp_torch.training.distributed import init_distributed, resolve_device
from mtp_torch.training.parameters import find_blocks
from mtp_torch.training.run_lock import run_lock
from mtp_torch.training.sources import load_dataset_examples, parse_field_mapping
from mtp_torch.training.step import StepMetrics
from mtp_torch.weights.default import (
    BASE_NAMES,
    CONVERTED_NAMES,
    DEFAULT_MODEL_NAME,
    cache_root,
    default_delta_path,
    load_named,
)
from mtp_torch.weights.delta import file_sha256, save_delta

__all__ = [
    "DEFAULT_NUM_EXAMPLES",
    "DEFAULT_RESPONSE_TOKENS",
    "TRAINING_OPTIONS",
    "add_arguments",
    "default_seed_prompts",
    "run",
]

# Rows of the self-written corpus and their length cap: writing them is part of the coffee break.
DEFAULT_NUM_EXAMPLES = 64
DEFAULT_RESPONSE_TOKENS = 192
_CORPUS_DTYPE = "float32"
_SEED_PROMPTS_ENV = "MTP_SEED_PROMPTS"


def default_seed_prompts() -> Path:
    """The seed-prompt file used when none is given: ``$MTP_SEED_PROMPTS``, else the bundled
    sample of GSM8K train questions (``mtp_torch/data/gsm8k_train_sample.jsonl``).

    Returns:
      The file's path.

    Raises:
      ValueError: if ``$MTP_SEED_PROMPTS`` names a file that does not exist.
    """
    from_env = os.environ.get(_SEED_PROMPTS_ENV)
    if from_env:
        if not Path(from_env).is_file():
            raise ValueError(
                f"${_SEED_PROMPTS_ENV}={from_env} does not exist; point it at a JSON-lines file "
                "of prompts or unset it"
            )
        return Path(from_env)
    return package_data("gsm8k_train_sample.jsonl")


def _init_delta(value: str) -> str:
    """``--init-delta``: ``default`` is the shipped default's delta; a path must exist."""
    if value == "default":
        return str(default_delta_path())
    if not Path(value).is_file():
        raise ValueError(f"--init-delta {value}: no such file (a gated delta, or 'default')")
    return value


def _train_layers(text: str) -> int | None:
    """``--train-layers``: a block count, or ``all`` (every weight trains)."""
    value = str(text).strip().lower()
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"--train-layers must be an integer or 'all', got {text!r}") from error


# The options that set DistillConfig fields; their defaults are cpu_preset's (shown in the help).
_BUDGET_OPTIONS = (
    ConfigOption("steps", "optimizer steps (no time limit)"),
    ConfigOption("minutes", "training time budget in minutes (default {default})"),
)
TRAINING_OPTIONS = (
    ConfigOption("k_max", "largest block size (default {default})"),
    ConfigOption(
        "k_min",
        "smallest block size a step draws (default {default}, the paper's); --k-min equal to "
        "--k-max trains every mask offset at every region",
    ),
    ConfigOption("loss", "training objective (default {default})"),
    ConfigOption("lr", "learning rate (default {default})"),
    ConfigOption("weight_decay", "AdamW weight decay (default {default}; the paper: 0.1)"),
    ConfigOption("mask_lr_multiplier", "extra step size of the mask embedding (default {default})"),
    ConfigOption("warmup_steps", "linear warm-up steps (default {default})"),
    ConfigOption(
        "lr_decay_steps",
        "decay the learning rate linearly to 0 over the last N of --steps, e.g. to anneal a "
        "run (resumable; default {default}: constant after warm-up)",
    ),
    ConfigOption(
        "lr_decay_minutes",
        "the same decay over the last M minutes of --minutes (wall clock; default {default})",
    ),
    ConfigOption("batch_size", "packed sequences per step (default {default})"),
    ConfigOption("grad_accum", "micro-steps per optimizer step (default {default})"),
    ConfigOption("seq_len", "slots per packed sequence (default {default})"),
    ConfigOption(
        "num_regions",
        "regions per sequence (default: {default})",
        none_text="seq_len // (2 k_max), the paper's density",
    ),
    ConfigOption(
        "train_layers",
        "train only the top N blocks (+ mask embedding), or 'all' (default {default})",
        none_text="all",
        type=str,
        parse=_train_layers,
    ),
    ConfigOption(
        "train_mask_embedding",
        "train the mask token's embedding rows (default: {default}; training them makes "
        "backward reach the bottom block)",
    ),
    ConfigOption(
        "lora_rank",
        "LoRA adapters of this rank on the trained blocks, merged on save; 0 trains the "
        "weights themselves (default {default})",
    ),
    ConfigOption(
        "lora_gate",
        "mask: adapters that act only at mask positions, so the model's own predictions stay "
        "bitwise the base model's (not merged; the gated preset: gt loss, rank 32, all "
        "blocks; default: {default})",
        none_text="none, merged LoRA",
    ),
    ConfigOption(
        "init_delta",
        "start the gated adapters from this gated delta file, or 'default' for the shipped "
        "default's, instead of zero (continues a conversion whose checkpoints are gone; "
        "needs --lora-gate mask; default: {default})",
        none_text="zero adapters",
        type=str,
        parse=_init_delta,
    ),
    ConfigOption(
        "lora_alpha",
        "LoRA scale numerator (default: {default})",
        none_text="the rank, a scale of 1",
    ),
    ConfigOption(
        "row_windows",
        "start each training window at a corpus row, so targets see their whole context "
        "(default: {default})",
    ),
    ConfigOption(
        "confident_targets",
        "train mask offsets fully only inside runs of tokens the teacher wrote with at least "
        "this top-1 probability (what ConfAdapt can accept); 0 disables (default {default})",
        none_text="0",
        parse=lambda value: value or None,
    ),
    ConfigOption(
        "unconfident_weight", "weight of mask targets outside such runs (default {default})"
    ),
    ConfigOption(
        "bf16",
        "bfloat16 autocast for the forward passes, also on the CPU (default: {default})",
        none_text="CUDA only",
    ),
    ConfigOption(
        "prefix_loss_weight",
        "weight of the anchor, a next-token loss at the real tokens added to --loss whatever "
        "it is (default {default}; 0 disables it)",
    ),
    ConfigOption(
        "prefix_loss_kind",
        "the anchor's kind: soft (KL to the teacher), hard (its argmax) or gt (the corpus; no "
        "teacher pass) (default: {default})",
        none_text="gt with --loss gt, else soft",
    ),
    ConfigOption(
        "dtype",
        "cast the weights of student and teacher to this dtype; LoRA adapters stay float32 "
        "(default: {default})",
        none_text="as loaded, float32",
    ),
    ConfigOption(
        "fsdp",
        "under torchrun, shard the model, gradients and AdamW state over the processes (FSDP2) "
        "instead of a whole copy each (default: {default})",
    ),
    ConfigOption(
        "gradient_checkpointing",
        "recompute each block's activations in the backward pass: less memory, ~1 more "
        "forward of time (default: {default})",
    ),
    ConfigOption(
        "split_passes",
        "with --lora-gate mask: run the real slots without autograd, then the mask slots alone "
        "with gradients (same loss and gradients, less compute) (default: {default})",
    ),
    ConfigOption(
        "attention",
        "attention of the training passes: FlexAttention block mask (flex, CUDA), dense mask "
        "through SDPA (sdpa), or flex on CUDA and sdpa elsewhere and for gated students whose "
        "passes split (auto; default {default})",
    ),
    ConfigOption("seed", "random seed (default {default})"),
    ConfigOption("checkpoint_every", "steps between checkpoints (default {default})"),
    ConfigOption(
        "device", "cpu, cuda, cuda:1 ... (default: {default})", none_text="cuda if available"
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``mtp convert`` options on ``parser``."""
    parser.add_argument(
        "--model",
        default="default-base",
        help="model directory (or Hub id) of a causal LM, or 'default-base' (the unconverted "
        f"embedded default, {DEFAULT_MODEL_NAME})",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="training corpus: a .jsonl file of {text}, {messages} or {question, answer} rows, a "
        ".txt file, or a Hugging Face dataset id or local dataset directory (read with `datasets`) "
        "(default: a corpus the model writes itself)",
    )
    parser.add_argument("--data-split", default="train", help="dataset split (default train)")
    parser.add_argument("--data-config", default=None, help="dataset configuration, e.g. main")
    parser.add_argument(
        "--data-fields",
        default=None,
        help="map corpus row fields to dataset columns, e.g. question=query,answer=response "
        "(MetaMathQA)",
    )
    parser.add_argument("--data-limit", type=int, default=None, help="read at most N dataset rows")
    parser.add_argument("--out", default=None, help="output directory (default: ./<model>-mtp)")
    preset = cpu_preset()
    add_config_options(
        parser.add_mutually_exclusive_group(), DistillConfig, preset, _BUDGET_OPTIONS
    )
    add_config_options(parser, DistillConfig, preset, TRAINING_OPTIONS)
    parser.add_argument(
        "--delta-out",
        default=None,
        help="also write the LoRA adapters and the mask row as one compact safetensors delta "
        "(needs --lora-rank > 0; how the embedded default's conversion ships)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from <out>.ckpt")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write --out even if it holds files mtp-lm did not write (they are kept)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=ConfAdapt().threshold,
        help=f"ConfAdapt threshold stored as the model's default (default {ConfAdapt().threshold})",
    )
    _add_corpus_arguments(
        parser.add_argument_group("self-written corpus (when --data is not given)")
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_corpus_arguments(corpus: argparse._ArgumentGroup) -> None:
    corpus.add_argument(
        "--seed-prompts",
        default=None,
        help="JSON-lines file of prompts ({question} or {messages}); default: "
        f"${_SEED_PROMPTS_ENV}, else the bundled GSM8K train sample; when they run out, the "
        "model samples prompts from its chat template",
    )
    corpus.add_argument(
        "--num-examples",
        type=int,
        default=DEFAULT_NUM_EXAMPLES,
        help=f"rows the model writes (default {DEFAULT_NUM_EXAMPLES})",
    )
    corpus.add_argument(
        "--response-tokens",
        type=int,
        default=DEFAULT_RESPONSE_TOKENS,
        help=f"length cap of each written response (default {DEFAULT_RESPONSE_TOKENS})",
    )
    corpus.add_argument(
        "--corpus-dtype",
        default=_CORPUS_DTYPE,
        help=f"dtype the model writes the corpus in (default {_CORPUS_DTYPE}); bfloat16 writes "
        "~1.7x faster on CPUs with AVX-512 BF16 and departs from float32 greedy text only where "
        "the model is unsure",
    )
    corpus.add_argument(
        "--corpus-batch-size",
        type=int,
        default=GENERATE_BATCH_SIZE,
        help=f"prompts the model answers per generate call (default {GENERATE_BATCH_SIZE})",
    )
    corpus.add_argument(
        "--corpus-cache",
        default=None,
        help="JSON-lines cache of the written corpus (default: in the mtp-lm cache dir)",
    )


def _load_model(name: str, dtype: str | None) -> tuple[Any, Any, str]:
    """(model in ``dtype``, default float32; tokenizer; a short name for paths).

    A Hub model is read straight in ``dtype``: an 8B model under ``torchrun`` is loaded by
    every process, so bfloat16 halves the host memory that takes."""
    if name in CONVERTED_NAMES:
        raise ValueError(
            f"--model {name} is already converted; convert the unconverted base with "
            "--model default-base"
        )
    named = load_named(name)
    if named is not None:
        return named[0], named[1], _short_name(name)
    # Lazy: transformers' Auto classes import their model registry (CLI start-up).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = check_model_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=getattr(torch, dtype or "float32"),
            attn_implementation="sdpa",
            trust_remote_code=False,
        )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except OSError as error:
        raise ValueError(
            f"cannot load model {name!r} ({error}); pass a model directory, a Hub id or "
            "'default-base'"
        ) from error
    return model, tokenizer, _short_name(name)


def _short_name(name: str) -> str:
    """The model's name in default paths (``<name>-mtp``)."""
    if name in (*CONVERTED_NAMES, *BASE_NAMES):
        return DEFAULT_MODEL_NAME
    return Path(name.rstrip("/")).name or "model"


def _config(args: argparse.Namespace, checkpoint_dir: Path, model: Any) -> DistillConfig:
    """``cpu_preset`` with what the command line set."""
    overrides: dict[str, Any] = {
        "out_dir": str(checkpoint_dir),
        "log_path": str(checkpoint_dir / "metrics.jsonl"),
        "resume": bool(args.resume),
        "progress": not args.no_progress,
    }
    overrides.update(config_overrides(args, (*_BUDGET_OPTIONS, *TRAINING_OPTIONS)))
    if args.steps is not None:
        overrides["minutes"] = None  # a step count replaces the time budget
    if args.train_layers is None:
        # The preset's block count, capped for small models (all blocks train then).
        preset_layers = cpu_preset().train_layers
        if preset_layers is not None and preset_layers >= len(find_blocks(model)):
            overrides["train_layers"] = None
    return cpu_preset(**overrides)


def _data_label(args: argparse.Namespace, sequences: list[Example]) -> str:
    """What the model card says the model was trained on."""
    if args.data is None:
        return f"{len(sequences)} answers the base model wrote itself (greedy) to seed prompts"
    if Path(args.data).is_file():
        return f"{Path(args.data).name}, {len(sequences)} rows"
    return f"{args.data} ({args.data_split}), {len(sequences)} rows"


def _corpus(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    model_name: str,
    seed: int,
    device: torch.device,
) -> list[Example]:
    """The training rows: ``--data``, else a corpus the model writes on ``device`` (cached)."""
    if args.data is not None:
        if Path(args.data).is_file():
            return load_examples(args.data, tokenizer, limit=args.data_limit)
        sequences = load_dataset_examples(
            args.data,
            tokenizer,
            split=args.data_split,
            config_name=args.data_config,
            fields=parse_field_mapping(args.data_fields),
            limit=args.data_limit,
        )
        return [Example(ids) for ids in sequences]
    seed_file = Path(args.seed_prompts) if args.seed_prompts else default_seed_prompts()
    seeds = read_seed_prompts(seed_file) if seed_file is not None else None
    if args.corpus_cache is not None:
        cache = Path(args.corpus_cache)
    else:
        key = json.dumps([model_name, str(seed_file), args.response_tokens, seed])
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        cache = cache_root() / "corpora" / f"{model_name}-{digest}.jsonl"
    # write_corpus reads the cache: only rows it lacks are written, answering these seeds.
    print(f"corpus: {cache} (rows it lacks answer the prompts of {seed_file})")
    # The corpus is written where training runs (the model moves there next anyway): on a GPU
    # a batch of 512 answers takes seconds, on the host's cores many minutes.
    dtype = parse_dtype(args.corpus_dtype)
    if dtype not in ("auto", next(model.parameters()).dtype):
        # A copy, cast and moved in one step: casting the model itself down and back would
        # round the weights it trains.
        writer = copy.deepcopy(model).to(device=device, dtype=dtype)
    else:
        writer = model.to(device)
    write_corpus(
        writer,
        tokenizer,
        cache,
        args.num_examples,
        seed_prompts=seeds,
        max_new_tokens=args.response_tokens,
        batch_size=args.corpus_batch_size,
        seed=seed,
        progress=not args.no_progress,
    )
    del writer
    return load_examples(cache, tokenizer, limit=args.num_examples)


def _trained_steps(last: list[StepMetrics], checkpoint_dir: Path) -> int:
    """Optimizer steps the saved model has had (a resumed run may take none itself)."""
    if last:
        return int(last[-1].step)
    found = latest_checkpoint(checkpoint_dir)
    return int(read_checkpoint_state(found)["step"]) if found is not None else 0


def run(args: argparse.Namespace) -> int:
    """Run ``mtp convert``: build the corpus, distil, save the MTP model; print a summary.

    The output directory is locked for the whole run (``training.run_lock``): a second
    ``mtp convert`` into the same ``--out`` fails at once, naming the process that holds it.
    """
    out = Path(args.out) if args.out else Path(f"{_short_name(args.model)}-mtp")
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 holds the lock
        return _run(args)
    with run_lock(out):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    preset = cpu_preset(**({"lora_gate": args.lora_gate} if args.lora_gate else {}))
    rank = args.lora_rank if args.lora_rank is not None else preset.lora_rank
    if args.delta_out is not None and not rank:
        raise ValueError("--delta-out needs LoRA adapters: add --lora-rank N (N > 0)")
    if args.lr_decay_steps and args.steps is None:
        raise ValueError(
            "--lr-decay-steps counts back from the last step, so it needs --steps N (a time "
            "budget does not say when the last step is)"
        )
    if args.out and _foreign_files(Path(args.out)) and not args.overwrite:
        raise FileExistsError(
            f"--out {args.out} holds files mtp-lm did not write; choose a new directory or add "
            "--overwrite (your files are kept)"
        )
    model, tokenizer, model_name = _load_model(args.model, args.dtype)
    out = Path(args.out) if args.out else Path(f"{model_name}-mtp")
    checkpoint_dir = out.parent / f"{out.name}.ckpt"
    cfg = _config(args, checkpoint_dir, model)
    started = time.perf_counter()
    # Under torchrun, rank 0 writes the corpus cache and the others read it afterwards.
    rank, world_size, local_rank = init_distributed()
    device = resolve_device(cfg.device, local_rank, world_size)
    if rank == 0:
        sequences = _corpus(args, model, tokenizer, model_name, cfg.seed, device)
    if world_size > 1:
        torch.distributed.barrier()
    if rank != 0:
        sequences = _corpus(args, model, tokenizer, model_name, cfg.seed, device)
    corpus_s = time.perf_counter() - started
    last: list[StepMetrics] = []
    mtp = distill(model, sequences, cfg, tokenizer=tokenizer, on_step=last.append)
    if rank != 0:
        return 0
    mtp.training_summary = {**(mtp.training_summary or {}), "data": _data_label(args, sequences)}
    path = mtp.save_pretrained(
        out, k_max=cfg.k_max, threshold=args.threshold, overwrite=args.overwrite
    )
    if args.delta_out is not None:
        assert mtp.delta is not None  # checked before training
        delta_path = save_delta(
            args.delta_out,
            mtp.delta,
            mask_token_id=mtp.mask_token_id,
            metadata={
                "base": str(args.model),
                "k_max": cfg.k_max,
                "threshold": args.threshold,
                "lora_rank": cfg.lora_rank,
                "steps": _trained_steps(last, checkpoint_dir),
                **({"gate": json.dumps(gate_settings(mtp.gate))} if mtp.gate else {}),
            },
        )
        digest = file_sha256(delta_path)
        Path(f"{delta_path}.sha256").write_text(f"{digest}  {delta_path.name}\n", encoding="utf-8")
    summary: dict[str, Any] = {
        "out": str(path),
        "corpus_minutes": round(corpus_s / 60, 2),
        "total_minutes": round((time.perf_counter() - started) / 60, 2),
        "k_max": cfg.k_max,
        "threshold": args.threshold,
    }
    summary["step"] = _trained_steps(last, checkpoint_dir)
    if last:
        summary.update(
            loss=round(last[-1].loss, 4),
            agreement=[round(a, 3) for a in last[-1].agreement],
        )
    print(json.dumps(summary))
    return 0
