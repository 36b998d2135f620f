"""Benchmark speed and quality of MTP decoding side by side with the baselines.

``mtp bench --model DIR`` decodes the same prompts one at a time with transformers' greedy
``generate`` (the baseline), prompt-lookup decoding, MTP static k, a ConfAdapt sweep and the
lossless mode, then writes a JSON report, prints a Markdown table and plots quality against
speed-up.  See ``mtp_torch.bench.runner`` for what the run does and
``mtp_torch.bench.report.MethodRow`` for what each column means.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtp_torch.bench.config import BenchConfig
from mtp_torch.bench.output import format_markdown, write_report
from mtp_torch.bench.plot import plot_report
from mtp_torch.bench.prompts import default_data_path, load_prompts
from mtp_torch.bench.runner import run_benchmark
from mtp_torch.cli.app import main as cli_main
from mtp_torch.cli.options import check_device, comma_separated
from mtp_torch.decoding.kernels import LINEAR_KERNELS
from mtp_torch.decoding.model import MTPModel
from mtp_torch.decoding.saving import check_model_source
from mtp_torch.dtypes import parse_dtype
from mtp_torch.weights.default import CONVERTED_NAMES, DEFAULT_MODEL_NAME, load_named

__all__ = ["add_arguments", "main", "run"]


def _int_or_auto(part: str) -> int | str:
    return "auto" if part.lower() == "auto" else int(part)


_int_list = comma_separated(int, "integers")
_float_list = comma_separated(float, "numbers")
_k_list = comma_separated(_int_or_auto, "integers or 'auto'")


# What ``mtp bench`` runs when no method option is given: the main job, sized to finish in
# ~10 minutes on 2 CPU cores (AVX2 or AVX-512): stock greedy and static_1 (the kernel's gain),
# then with the kernel chosen per width on this machine greedy, static_1, ConfAdapt(0.9) at the
# cost-aware k_max, and both lossless modes (confidence-gated drafts and every mask drafted).
# ``--sweep`` runs BenchConfig's full sweep instead.
MAIN_JOB = BenchConfig(
    max_new_tokens=96,
    k_max=("auto",),
    thresholds=(0.9,),
    static=(1,),
    verify_thresholds=(0.9,),
    verify_static=(3,),
    repeats=3,
    kernel="auto",
    prompt_lookup_tokens=None,
    cost_max_tokens=8,  # the widest pass these methods run (k_max <= 4, verify 2k - 1)
    auto_candidates=(1, 2, 3, 4),
    probe_prompts=2,
    probe_tokens=48,
)
MAIN_JOB_PROMPTS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``mtp bench`` options on ``parser`` (defaults: the main job, ``MAIN_JOB``)."""
    defaults = MAIN_JOB
    _add_io_arguments(parser)
    _add_method_arguments(parser, defaults)
    _add_measure_arguments(parser, defaults)
    _add_model_arguments(parser)


def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the prompts, and where the report goes."""
    parser.add_argument(
        "--model",
        default="default",
        help="converted checkpoint directory, or 'default' (the embedded default "
        f"{DEFAULT_MODEL_NAME}, converted by the delta shipped in the package)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="prompts, JSON lines with 'question' (GSM8K; chat template applied), 'prompt' or "
        "'text' (default: the bundled held-out GSM8K test rows and instructions)",
    )
    parser.add_argument("--out", default="bench_report.json", help="JSON report to write")
    parser.add_argument(
        "--plot", default=None, help="PNG plot to write (default: the report's path with .png)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help=f"first N prompts of --data (default {MAIN_JOB_PROMPTS}; 50 with --sweep)",
    )
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed questions/prompts without the chat template",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def _add_method_arguments(parser: argparse.ArgumentParser, defaults: BenchConfig) -> None:
    """Which methods run: the sweep, the baselines, the int8 copy."""
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument(
        "--k-max",
        type=_k_list,
        default=defaults.k_max,
        help="ConfAdapt k_max values, comma-separated; 'auto' adds the cost-aware choice",
    )
    parser.add_argument(
        "--thresholds",
        type=_float_list,
        default=defaults.thresholds,
        help="ConfAdapt thresholds, comma-separated",
    )
    parser.add_argument(
        "--static",
        type=_int_list,
        default=defaults.static,
        help="static-k values, comma-separated ('' for none)",
    )
    parser.add_argument(
        "--verify-thresholds",
        type=_float_list,
        default=defaults.verify_thresholds,
        help="thresholds also run in the lossless mode, each k_max ('' for none)",
    )
    parser.add_argument(
        "--verify-static",
        type=_int_list,
        default=defaults.verify_static,
        help="k values of lossless rows that draft every mask proposal, StaticK(k) with "
        "verify (verify_static_{k}; comma-separated, '' for none)",
    )
    parser.add_argument(
        "--prompt-lookup-tokens",
        type=int,
        default=defaults.prompt_lookup_tokens or 0,
        help="prompt_lookup_num_tokens of the prompt-lookup baseline (0, the default, skips it)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="run the full sweep (k_max 4,8,16; thresholds 0.99-0.6; static 2,3; prompt lookup; "
        "50 prompts x 256 tokens) instead of the main job's methods; explicit options still win",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=defaults.quantize,
        help="also bench a dynamically int8-quantised copy (CPU only), reported in separate rows",
    )
    parser.add_argument(
        "--kernel",
        choices=list(LINEAR_KERNELS),
        default=defaults.kernel or "stock",
        help="CPU Linear kernel of the MTP rows: 'auto' (default: the fastest per pass width, "
        "measured once on this machine), 'native', 'skinny'; rows ..._{kernel}, beside stock "
        "greedy and static_1 so the kernel's gain stays apart from MTP's; 'stock' runs every "
        "method with PyTorch's own products only",
    )
    parser.add_argument(
        "--packed",
        action="store_true",
        help="the kernel rows read weights that are a GGUF Q4_1/Q8_0 code (the default's) "
        "packed: the same outputs bit for bit, faster passes, a smaller gain for MTP "
        "(docs/guides/decoding.md)",
    )


def _add_measure_arguments(parser: argparse.ArgumentParser, defaults: BenchConfig) -> None:
    """How speed is measured: repeats and the cost curve."""
    parser.add_argument(
        "--repeats",
        type=int,
        default=defaults.repeats,
        help="timed passes; speed is the median",
    )
    parser.add_argument("--no-cost-curve", action="store_true", help="skip the cost-curve timing")
    parser.add_argument(
        "--cost-max-tokens", type=int, default=defaults.cost_max_tokens, help="widest pass timed"
    )
    parser.add_argument(
        "--cost-repeats", type=int, default=defaults.cost_repeats, help="timed passes per width"
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The teacher, the baseline model, the device and the dtype."""
    parser.add_argument(
        "--teacher",
        default=None,
        help="original model directory scoring the generated tokens, or 'default-base' for "
        "the unconverted embedded default (default: 'default-base' for --model default, else "
        "the checkpoint itself as a plain LM over real tokens)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="model whose transformers greedy generate (and prompt lookup) is the baseline, "
        "e.g. 'default-base', the model a conversion started from (default: 'default-base' "
        "for --model default, else the checkpoint itself)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="run the MTP rows on a registered decoding backend (a plug-in's "
        "'mtp_core.backends' entry point); default: the built-in one",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16 or auto (default: float32 on cpu, bfloat16 on cuda)",
    )


def _load_teacher(path: str, device: str) -> torch.nn.Module:
    # Lazy: transformers' Auto classes import their model registry (CLI start-up).
    from transformers import AutoModelForCausalLM

    named = load_named(path)
    if named is not None:
        model: torch.nn.Module = named[0].to(device)
        model.eval()
        return model
    path = check_model_source(path)
    teacher: Any = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    )
    teacher.to(device)
    teacher.eval()
    module: torch.nn.Module = teacher
    return module


def run(args: argparse.Namespace) -> int:
    """Run ``mtp bench``: decode, score, write the JSON report and the plot, print the table.

    Returns:
      0 on success.

    Raises:
      ValueError: on bad options, a missing prompt file, or a model without a tokenizer.
    """

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    data = Path(args.data) if args.data else default_data_path()
    if data.is_dir():
        raise ValueError(f"--data {data} is a directory; give a JSON-lines prompt file")
    if not data.is_file():
        raise ValueError(f"--data {data} does not exist; give a JSON-lines prompt file")
    check_device(device)
    if args.quantize == "int8" and not str(device).startswith("cpu"):
        raise ValueError(
            "--quantize int8 (dynamic quantisation) runs on the CPU only; add --device cpu"
        )
    kernel = None if args.kernel == "stock" else args.kernel
    if kernel is not None and not str(device).startswith("cpu"):
        say(f"--kernel {args.kernel} is a CPU kernel: on {device} every method runs stock")
        kernel = None
    methods = _method_options(args)
    if args.quantize == "int8" and dtype_name not in ("float32", "fp32"):
        raise ValueError("--quantize int8 compares against float32; drop --dtype or use float32")
    config = BenchConfig(
        max_new_tokens=methods["max_new_tokens"],
        k_max=methods["k_max"],
        thresholds=methods["thresholds"],
        static=methods["static"],
        verify_thresholds=methods["verify_thresholds"],
        verify_static=methods["verify_static"],
        repeats=args.repeats,
        quantize=args.quantize,
        kernel=kernel,
        prompt_lookup_tokens=methods["prompt_lookup_tokens"] or None,
        cost_curve=not args.no_cost_curve,
        cost_max_tokens=args.cost_max_tokens,
        cost_repeats=args.cost_repeats,
    )
    say(f"loading {args.model} ({dtype_name}, {device}) ...")
    if args.packed and kernel not in ("native", "auto"):
        raise ValueError("--packed needs the compiled kernel: --kernel auto or --kernel native")
    mtp = MTPModel.from_pretrained(
        args.model,
        dtype=parse_dtype(dtype_name),
        device=device,
        backend=args.backend,
        packed_weights=True if args.packed else None,
    )
    if mtp.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; save one with the model to bench it")
    num_prompts = args.num_prompts
    if num_prompts is None:
        num_prompts = 50 if args.sweep else MAIN_JOB_PROMPTS
    prompts = load_prompts(
        data, mtp.tokenizer, num_prompts=num_prompts, chat=not args.no_chat_template
    )
    teacher_name, teacher, baseline = _reference_models(args, device)
    report = run_benchmark(
        mtp,
        prompts,
        config,
        teacher=teacher,
        teacher_label=teacher_name,
        meta={
            "model": str(args.model),
            # The bundled file is named package-relative: a report holds no path of one machine.
            "data": str(data) if args.data else "<package>/mtp_torch/data/" + data.name,
            "command": " ".join(["mtp", "bench", *_argv(args)]),
        },
        log=say,
        baseline_model=baseline,
    )
    write_report(report, args.out)
    print(format_markdown(report))
    print(f"report: {args.out}")
    if not args.no_plot:
        plot_path = args.plot or str(Path(args.out).with_suffix(".png"))
        plot_report(report, plot_path)
        print(f"plot: {plot_path}")
    return 0


def _reference_models(args: argparse.Namespace, device: str) -> tuple[str | None, Any, Any]:
    """``(teacher name, teacher, baseline)``; the embedded default's original model ships too,
    so for ``--model default`` it is the teacher and the baseline unless others are given."""
    converted_default = str(args.model) in CONVERTED_NAMES
    teacher_name = args.teacher or ("default-base" if converted_default else None)
    baseline_name = args.baseline or ("default-base" if converted_default else None)
    teacher = _load_teacher(teacher_name, device) if teacher_name else None
    baseline = None
    if baseline_name:
        same = baseline_name == teacher_name and teacher is not None
        baseline = teacher if same else _load_teacher(baseline_name, device)
    return teacher_name, teacher, baseline


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options: as given, with ``--sweep`` turning main-job defaults into the sweep's."""
    names = (
        "max_new_tokens", "k_max", "thresholds", "static", "verify_thresholds", "verify_static",
        "prompt_lookup_tokens",
    )  # fmt: skip
    chosen = {name: getattr(args, name) for name in names}
    if args.sweep:
        sweep = BenchConfig()
        for name in names:
            main_default = getattr(MAIN_JOB, name)
            if name == "prompt_lookup_tokens":
                main_default = main_default or 0
            if chosen[name] == main_default:
                chosen[name] = getattr(sweep, name)
    return chosen


def _argv(args: argparse.Namespace) -> list[str]:
    """The command's options, reconstructed from the parsed namespace (for the report)."""
    parts: list[str] = []
    for key, value in sorted(vars(args).items()):
        if key.startswith("_") or key in ("command", "verbose") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, tuple):
            parts += [flag, ",".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mtp bench`` as a stand-alone command (same options and errors as the subcommand).

    Args:
      argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
      The exit status: 0 on success, 2 when it fails.
    """
    return cli_main(["bench", *(sys.argv[1:] if argv is None else list(argv))])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
