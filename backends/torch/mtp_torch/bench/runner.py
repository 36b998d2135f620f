"""Speed and quality side by side: ``run_benchmark``, the library behind ``mtp bench``.

One process, the same prompts, one sequence at a time (batch 1, like the paper), for every
method of ``mtp_torch.bench.methods``: transformers' greedy ``generate`` (the baseline),
prompt-lookup decoding, MTP static k, the ConfAdapt sweep, the lossless mode, the cost-aware
``k_max="auto"``, and with ``quantize="int8"`` the same on a dynamically int8-quantised copy.

Quality: GSM8K accuracy when prompts carry a reference answer, the teacher's mean negative
log-likelihood per generated token, and agreement with the greedy baseline (common prefix,
token F1, exact match).  Speed: tokens per forward pass (the paper's acceleration factor),
tokens per second, wall-clock speed-up over ``greedy`` of the same precision (``speedup``) and
over stock full-precision ``greedy`` (``speedup_vs_fp32_greedy``), the ceiling the measured cost
curve allows, and peak memory.  The report is a ``BenchReport`` (``mtp_torch.bench.report``).

The teacher: the paper's teacher is the frozen initial checkpoint.  A converted checkpoint does
not carry it, so by default the checkpoint itself, run as a plain next-token LM over real tokens
only (prompt + generated text, no masks), scores every method; pass ``teacher=`` (``--teacher``)
to score with the original model instead.  Both score all methods the same way, so the column
compares methods; only with the original model is it the paper's teacher likelihood.

Reference: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019.
"""

from __future__ import annotations

import datetime as _datetime
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers

from mtp_core import AcceptancePolicy
from mtp_torch.bench.config import BenchConfig
from mtp_torch.bench.cost import (
    COST_CONTEXT_LENGTH,
    COST_REPEATS,
    DEFAULT_K_CANDIDATES,
    CostCurve,
    acceptance_from_histogram,
    auto_policy,
    choose_k_max,
    expected_speedups,
    measure_cost_curve,
)
from mtp_torch.bench.measure import (
    Trace,
    machine_info,
    median,
    model_device,
    peak_memory_mb,
    quantize_int8,
    reset_peak_memory,
    teacher_nll,
    timed_decode,
)
from mtp_torch.bench.methods import (
    BenchMethod,
    ConfAdaptDecoding,
    GreedyGenerate,
    ModelsUnderTest,
    RunSettings,
    StaticKDecoding,
    bench_methods,
    policy_label,
)
from mtp_torch.bench.prompts import BenchPrompt
from mtp_torch.bench.quality import agreement, grade_answers, mean, mean_teacher_nll
from mtp_torch.bench.report import BenchReport, KMaxChoice, MethodRow, summarize, with_speedups
from mtp_torch.decoding.calibrate import auto_plan
from mtp_torch.decoding.fused import packed_by_default
from mtp_torch.decoding.gated import find_mask_gate
from mtp_torch.decoding.kernels import STOCK_PLAN, KernelPlan, fixed_plan, use_kernels
from mtp_torch.text import stop_token_ids

__all__ = ["BenchConfig", "run_benchmark"]

Log = Callable[[str], None]

_DEFAULT_TEACHER = (
    "the checkpoint itself as a plain LM over real tokens (original model unavailable)"
)


def run_benchmark(
    mtp_model: Any,
    prompts: Sequence[BenchPrompt],
    config: BenchConfig | None = None,
    *,
    teacher: torch.nn.Module | None = None,
    teacher_label: str | None = None,
    meta: dict[str, Any] | None = None,
    log: Log | None = None,
    baseline_model: torch.nn.Module | None = None,
) -> BenchReport:
    """Run every method on the same prompts and return the report.

    Args:
      mtp_model: an ``MTPModel`` (its ``model`` runs, its ``tokenizer`` decodes answers).
      prompts: the benchmark prompts (``load_prompts``).
      config: what to run; ``None`` uses the defaults.
      teacher: the model that scores generated tokens; ``None`` uses ``mtp_model.model`` as a
        plain LM on real tokens (see the module docstring).
      teacher_label: how the report names the teacher (a path); ``None`` for the default.
      meta: extra fields for the report's ``meta`` (command, model path, data file ...).
      log: progress messages (``None``: silent).
      baseline_model: the model whose transformers ``generate`` the ``greedy`` and
        ``prompt_lookup`` rows run (e.g. the unconverted model a conversion started from);
        ``None``: ``mtp_model.model``.  Speed-ups and agreement are against its greedy output.

    Returns:
      The ``BenchReport``; ``report.to_dict()`` is the JSON ``mtp bench --out`` writes:
      ``{"meta", "cost_curve", "k_max_choice", "methods": [row, ...], "summary"}``.

    Raises:
      ValueError: for no prompts, or ``quantize="int8"`` on a model not on the CPU.
    """
    config = BenchConfig() if config is None else config
    say: Log = log if log is not None else (lambda message: None)
    if len(prompts) == 0:
        raise ValueError("no prompts: give at least one BenchPrompt (see load_prompts)")
    hf_model: torch.nn.Module = mtp_model.model
    hf_model.eval()
    settings = _decode_settings(mtp_model, config)
    machine = _machine_at_start(say)

    # 1. The kernel plan, the cost curve of one forward pass (stock, and with the kernel), and
    #    k_max="auto" resolved per threshold (on the kernel's curve when there is one).
    plan = _kernel_plan(mtp_model, config, say)
    curve = _cost_curve(mtp_model, config, say)
    kernel_curve = _cost_curve(mtp_model, config, say, plan) if plan is not None else None
    kernel_curve, chosen = _auto_policies(
        mtp_model, prompts, config, kernel_curve or curve, settings, say, plan
    )
    if plan is None:
        curve, kernel_curve = kernel_curve, None

    # 2. The methods, and the models of each precision they run on.
    bundles, methods = _models_and_methods(mtp_model, config, chosen, baseline_model, say, plan)

    # 3. Warm-up on the first prompt (untimed).
    for method in methods:
        timed_decode(method, bundles[method.precision], prompts[0], settings)

    # 4. Timed repeats over all prompts, methods interleaved so drift spreads evenly.
    traces = _time_methods(methods, bundles, prompts, settings, int(config.repeats), say)

    # 5. Quality (teacher NLL, accuracy, agreement with greedy), outside the timing.
    scorer = teacher if teacher is not None else hf_model
    dtype = str(next(hf_model.parameters()).dtype).replace("torch.", "")
    rows = [_method_row(method, traces, prompts, scorer, mtp_model, dtype) for method in methods]

    # 6. Speed-ups (medians of per-round ratios, with their spread) against greedy of the same
    #    precision, stock greedy and StaticK(1) of the same model and kernel; ceilings; summary.
    rows = with_speedups(
        rows,
        [GreedyGenerate(method.precision).name for method in methods],
        GreedyGenerate().name,
        {m.precision: kernel_curve if m.precision == config.kernel else curve for m in methods},
        static_baselines=[StaticKDecoding(1, method.precision).name for method in methods],
    )
    described = None if plan is None else plan.describe() + _packed_note(mtp_model)
    extra = {**(meta or {}), **({"kernel_plan": described} if described is not None else {})}
    return BenchReport(
        meta=_meta(
            machine, model_device(hf_model), settings, dtype, len(prompts), int(config.repeats),
            teacher_label, extra,
        ),  # fmt: skip
        cost_curve=curve,
        k_max_choice=_k_max_choices(methods, rows, kernel_curve or curve),
        methods=rows,
        summary=summarize(rows),
        kernel_cost_curve=kernel_curve,
    )


def _kernel_plan(mtp_model: Any, config: BenchConfig, say: Log) -> KernelPlan | None:
    """The plan of ``config.kernel`` for this model on this machine (``None``: no kernel rows)."""
    if config.kernel is None:
        return None
    if config.kernel == "auto":
        say("choosing the Linear kernel per pass width (measured once per machine, cached) ...")
        plan = auto_plan(mtp_model.model)
    else:
        plan = fixed_plan(config.kernel)
    say(f"kernel {plan.describe()}{_packed_note(mtp_model)}")
    return plan


def _decode_settings(mtp_model: Any, config: BenchConfig) -> RunSettings:
    """The budget, the model's stop ids, and a pad id (tokenizer's, else a stop id, else 0)."""
    tokenizer = getattr(mtp_model, "tokenizer", None)
    eos_ids = stop_token_ids(None, mtp_model.model, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    return RunSettings(int(config.max_new_tokens), eos_ids, pad_id)


def _cost_curve(
    mtp_model: Any, config: BenchConfig, say: Log, plan: KernelPlan | None = None
) -> CostCurve | None:
    """Measure the cost curve when the config asks for it (inside ``plan`` when given), through
    the backend decoding runs on under that plan."""
    if not config.cost_curve:
        return None
    label = "stock" if plan is None else plan.describe()
    say(f"measuring the cost curve of one forward pass ({label}) ...")
    return _measure(
        mtp_model, plan, config.cost_max_tokens, config.cost_context, config.cost_repeats
    )


def _measure(
    mtp_model: Any, plan: KernelPlan | None, max_tokens: int, context: int, repeats: int
) -> CostCurve:
    """``measure_cost_curve`` of the passes ``generate`` runs under ``plan`` (stock: ``None``).

    A mask-gated model's multi-token passes are timed as 1 token + ``n - 1`` mask rows, as its
    decoding runs them: its adapters act at mask rows only, and cost ~0.1 of a one-token pass
    there on the development CPU, which a block of real tokens would not show.
    """
    hf_model = mtp_model.model
    backend = getattr(mtp_model, "decoding_backend", None)
    gated = find_mask_gate(hf_model) is not None
    with use_kernels(plan or STOCK_PLAN, hf_model):
        return measure_cost_curve(
            hf_model,
            max_tokens=max_tokens,
            context_length=context,
            repeats=repeats,
            backend=None if backend is None else backend(plan or STOCK_PLAN),
            mask_token_id=int(mtp_model.mask_token_id) if gated else None,
        )


def _auto_candidates(candidates: Sequence[int], mtp_model: Any) -> tuple[int, ...]:
    """The ``k_max`` candidates of ``"auto"``, each capped at the ``k_max`` the model was trained for.

    Mask offsets beyond the trained ``k_max`` were never taught, so probing them only costs
    time: a candidate above it becomes the trained value. Candidates at or below it stay as
    given (a caller who asks for ``(1, 2)`` never gets ``k_max=4``); one token a pass (``1``)
    is always a candidate.
    """
    trained = getattr(getattr(mtp_model, "default_policy", None), "k_max", None)
    if not isinstance(trained, int):
        return tuple(int(k) for k in candidates)
    return tuple(sorted({min(int(k), trained) for k in candidates} | {1}))


def _auto_policies(
    mtp_model: Any,
    prompts: Sequence[BenchPrompt],
    config: BenchConfig,
    curve: CostCurve | None,
    settings: RunSettings,
    say: Log,
    plan: KernelPlan | None = None,
) -> tuple[CostCurve | None, dict[float, AcceptancePolicy]]:
    """For ``k_max="auto"``: ``auto_policy`` per threshold, probing the first prompts.

    Returns:
      The cost curve (measured here if ``"auto"`` needs one and none was) and
      ``{threshold: policy}`` (empty without ``"auto"``).
    """
    chosen: dict[float, AcceptancePolicy] = {}
    if "auto" not in config.k_max:
        return curve, chosen
    candidates = _auto_candidates(config.auto_candidates, mtp_model)
    if curve is None:
        curve = _measure(
            mtp_model, plan, max(2 * max(candidates), 2), COST_CONTEXT_LENGTH, COST_REPEATS
        )
    probe = [list(p.input_ids) for p in prompts[: max(int(config.probe_prompts), 1)]]
    for tau in sorted({*config.thresholds, *config.verify_thresholds}):
        policy = auto_policy(
            mtp_model,
            tau,
            candidates=candidates,
            probe_prompts=probe,
            curve=curve,
            max_new_tokens=config.probe_tokens,
            eos_token_id=settings.eos_argument(),
        )
        chosen[float(tau)] = policy
        say(f"k_max=auto at threshold {tau:g}: {policy_label(policy)}")
    return curve, chosen


def _models_and_methods(
    mtp_model: Any,
    config: BenchConfig,
    chosen: dict[float, AcceptancePolicy],
    baseline_model: torch.nn.Module | None,
    say: Log,
    plan: KernelPlan | None = None,
) -> tuple[dict[str, ModelsUnderTest], list[BenchMethod]]:
    """The models per precision and the methods to run on them (full precision first).

    ``StaticK(1)`` always runs (every MTP row is also compared with it, same model and kernel).
    With a kernel, the stock products run only the baselines and ``static_1`` (what the kernel
    adds) and every MTP method runs with the kernel (what MTP adds on top of it).
    """
    static = tuple(sorted({1, *config.static}))

    def methods_for(precision: str) -> list[BenchMethod]:
        # The lossless mode runs at full precision only, prompt lookup with the stock kernel only.
        if precision == "base" and plan is not None:
            return bench_methods(
                k_max=(),
                thresholds=(),
                static=(1,),
                verify_thresholds=(),
                prompt_lookup_tokens=config.prompt_lookup_tokens,
                precision=precision,
            )
        return bench_methods(
            k_max=config.k_max,
            thresholds=config.thresholds,
            static=static,
            verify_thresholds=config.verify_thresholds if precision != "int8" else (),
            verify_static=config.verify_static if precision != "int8" else (),
            prompt_lookup_tokens=config.prompt_lookup_tokens if precision == "base" else None,
            auto_policies=chosen,
            precision=precision,
        )

    bundles = {"base": ModelsUnderTest("base", mtp_model.model, mtp_model, baseline_model)}
    methods = methods_for("base")
    if plan is not None and config.kernel is not None:
        bundles[config.kernel] = ModelsUnderTest(
            config.kernel,
            mtp_model.model,
            _sibling(mtp_model, linear_kernel=config.kernel),
            baseline_model,
            kernel=plan,
        )
        methods += methods_for(config.kernel)
    if config.quantize == "int8":
        say("quantising Linear layers to int8 (dynamic) ...")
        quantized = quantize_int8(mtp_model.model)
        quantized_mtp = type(mtp_model)(
            quantized,
            mask_token_id=mtp_model.mask_token_id,
            tokenizer=getattr(mtp_model, "tokenizer", None),
            backend=getattr(mtp_model, "backend_name", None),
        )
        quantized_baseline = None if baseline_model is None else quantize_int8(baseline_model)
        bundles["int8"] = ModelsUnderTest("int8", quantized, quantized_mtp, quantized_baseline)
        methods += methods_for("int8")
    return bundles, methods


def _packed_note(mtp_model: Any) -> str:
    """``", packed weights"`` when the kernel rows read packed weights (the model's option, or
    ``MTP_LM_PACKED=1`` when the option is unset)."""
    packed = getattr(mtp_model, "packed_weights", None)
    if packed is None:
        packed = packed_by_default()
    return ", packed weights" if packed else ""


def _sibling(mtp_model: Any, linear_kernel: str) -> Any:
    """An ``MTPModel`` on the same weights that decodes with ``linear_kernel``: its ``generate``
    then picks the backend that kernel runs (the fused pass for the compiled kernel on a Llama),
    as a user's ``MTPModel.from_pretrained(..., linear_kernel=...)`` would.  Patching the
    products around the original (stock) wrapper would keep transformers' forward."""
    sibling = type(mtp_model)(
        mtp_model.model,
        mask_token_id=mtp_model.mask_token_id,
        tokenizer=getattr(mtp_model, "tokenizer", None),
        linear_kernel=linear_kernel,
        backend=getattr(mtp_model, "backend_name", None),
        packed_weights=getattr(mtp_model, "packed_weights", None),
    )
    sibling.default_policy = mtp_model.default_policy
    sibling.verify_policy = mtp_model.verify_policy
    return sibling


def _time_methods(
    methods: Sequence[BenchMethod],
    bundles: dict[str, ModelsUnderTest],
    prompts: Sequence[BenchPrompt],
    settings: RunSettings,
    repeats: int,
    say: Log,
) -> dict[str, Trace]:
    """Decode every prompt with every method, ``repeats`` times; outputs from the first repeat."""
    device = model_device(bundles["base"].hf_model)
    traces = {method.name: Trace() for method in methods}
    for repeat in range(repeats):
        for method in methods:
            trace = traces[method.name]
            reset_peak_memory(device)
            total = 0.0
            for prompt in prompts:
                decoded = timed_decode(method, bundles[method.precision], prompt, settings)
                total += decoded.seconds
                if repeat == 0:
                    trace.record(decoded)
            trace.repeat_seconds.append(total)
            trace.peak_memory_mb = max(trace.peak_memory_mb, peak_memory_mb(device))
            tokens = sum(len(g) for g in trace.generated)
            say(
                f"[{repeat + 1}/{repeats}] {method.name}: {tokens} tokens in {total:.2f}s "
                f"({tokens / total if total > 0 else float('nan'):.1f} tok/s)"
            )
    return traces


def _method_row(
    method: BenchMethod,
    traces: dict[str, Trace],
    prompts: Sequence[BenchPrompt],
    scorer: torch.nn.Module,
    mtp_model: Any,
    dtype: str,
) -> MethodRow:
    """Score one method's outputs and put its speed and quality in one report row."""
    trace = traces[method.name]
    info = method.describe()
    # Quality: the teacher's likelihood, GSM8K answers, agreement with greedy.
    nll, skipped = mean_teacher_nll(
        [teacher_nll(scorer, p, g) for p, g in zip(prompts, trace.generated, strict=True)]
    )
    tokenizer = getattr(mtp_model, "tokenizer", None)
    graded = [
        (tokenizer.decode(generated, skip_special_tokens=True), prompt.reference_answer)
        for prompt, generated in zip(prompts, trace.generated, strict=True)
        if prompt.reference_answer is not None and tokenizer is not None
    ]
    correct = grade_answers([text for text, _ in graded], [ref for _, ref in graded])
    stock = agreement(trace.generated, traces[GreedyGenerate().name].generated)
    same = None
    if method.precision != "base":
        same = agreement(trace.generated, traces[GreedyGenerate(method.precision).name].generated)
    # Speed: tokens per forward pass and per second (the median repeat).
    tokens = sum(len(g) for g in trace.generated)
    forwards = sum(trace.forwards)
    seconds = median(trace.repeat_seconds)
    return MethodRow(
        name=info.name,
        family=info.family,
        precision=_precision_label(method.precision, dtype),
        policy=policy_label(info.policy),
        verify=info.verify,
        threshold=info.threshold,
        k_max=info.k_max,
        k_max_auto=info.k_max_auto,
        prompt_lookup_tokens=info.prompt_lookup_tokens,
        num_prompts=len(prompts),
        generated_tokens=tokens,
        forward_passes=forwards,
        tokens_per_forward=tokens / forwards if forwards else None,
        mean_pass_width=mean(trace.decode_widths),
        seconds=seconds,
        seconds_per_repeat=trace.repeat_seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else None,
        accuracy=correct / len(graded) if graded else None,
        num_correct=correct if graded else None,
        num_graded=len(graded),
        teacher_nll=nll,
        teacher_nll_skipped_tokens=skipped,
        agreement_prefix=stock.prefix,
        agreement_prefix_fraction=stock.prefix_fraction,
        exact_match=stock.exact_match,
        token_f1=stock.token_f1,
        peak_memory_mb=trace.peak_memory_mb,
        accepted_histogram=trace.histogram,
        agreement_prefix_same_precision=None if same is None else same.prefix,
        token_f1_same_precision=None if same is None else same.token_f1,
    )


def _k_max_choices(
    methods: Sequence[BenchMethod], rows: Sequence[MethodRow], curve: CostCurve | None
) -> list[KMaxChoice]:
    """Per threshold, the cost-aware ``k_max`` from the widest full-precision ConfAdapt row."""
    if curve is None:
        return []
    widest: dict[float, tuple[int, MethodRow, tuple[int, ...]]] = {}
    for method, row in zip(methods, rows, strict=True):
        histogram = row.accepted_histogram
        if not isinstance(method, ConfAdaptDecoding) or method.verify or not histogram:
            continue
        if method.precision != "base":
            continue
        if method.threshold not in widest or method.k_max > widest[method.threshold][0]:
            widest[method.threshold] = (method.k_max, row, histogram)
    choices = []
    for tau, (k_max, row, histogram) in sorted(widest.items(), reverse=True):
        try:
            acceptance = acceptance_from_histogram(histogram)
        except ValueError:
            continue
        candidates = [k for k in DEFAULT_K_CANDIDATES if k <= k_max]
        scores = expected_speedups(curve, acceptance, candidates)
        choices.append(
            KMaxChoice(
                threshold=tau,
                from_method=row.name,
                acceptance=acceptance.tolist(),
                expected_speedup={str(k): v for k, v in scores.items()},
                chosen_k_max=choose_k_max(curve, acceptance, candidates),
            )
        )
    return choices


def _machine_at_start(say: Log) -> dict[str, Any]:
    """The report's ``meta.machine``, read before the run (so the load on the CPU is others'
    work and the model's loading), after ``_warn_if_busy``."""
    machine = machine_info()
    _warn_if_busy(machine, say)
    return machine


def _warn_if_busy(machine: dict[str, Any], say: Log) -> None:
    """Say so when other work already keeps every core busy: the timings would measure it.

    The 1-minute load average counts this process too (loading the model), so only a load
    above the core count says that something else is running.
    """
    load, cores = machine.get("load_average_at_start"), machine.get("cpu_count")
    if load is not None and cores and load > cores:
        say(
            f"warning: the CPU is already busy (1-minute load average {load:g} on {cores} "
            "cores): other processes skew every timing here; run the benchmark on an "
            "otherwise idle machine (see 'Two processes on one CPU' in the benchmarking guide)"
        )


def _meta(
    machine: dict[str, Any],
    device: torch.device,
    settings: RunSettings,
    dtype: str,
    num_prompts: int,
    repeats: int,
    teacher_label: str | None,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """The report's provenance: machine, versions, date, command, the run, the caller's fields."""
    return {
        "machine": machine,
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "dtype": dtype,
        "num_prompts": num_prompts,
        "max_new_tokens": settings.max_new_tokens,
        "repeats": repeats,
        "batch_size": 1,
        "eos_token_ids": list(settings.eos_token_ids),
        "teacher": teacher_label or _DEFAULT_TEACHER,
        "speedup_definition": (
            "tokens/s over greedy transformers generate of the same precision; "
            "speedup_vs_fp32_greedy: over stock full-precision greedy"
        ),
        **(extra or {}),
    }


def _precision_label(precision: str, dtype: str) -> str:
    """The report's precision: the dtype, ``int8``, or the dtype and the kernel's name."""
    if precision in ("base", "int8"):
        return dtype if precision == "base" else precision
    return f"{dtype} {precision}"
