"""Speed and quality side by side: the library behind ``mtp bench``.

One process, the same prompts, one sequence at a time (batch 1, like the paper), for every
method:

- ``greedy``: transformers' ``generate`` (greedy), the baseline every speed-up is measured from;
- ``prompt_lookup``: transformers' prompt-lookup decoding (``prompt_lookup_num_tokens``), a
  training-free speculative baseline;
- ``static_{k}``: MTP decoding keeping all ``k`` proposals (paper: static k);
- ``confadapt_{tau}_k{k_max}``: MTP decoding with ConfAdapt (paper: the threshold sweep);
- ``verify_confadapt_{tau}_k{k_max}``: the lossless mode (the same weights verify their own
  proposals; output equals greedy exactly);
- with ``quantize="int8"`` the same methods again on a dynamically int8-quantised copy, named
  with an ``_int8`` suffix.

Quality: GSM8K accuracy when prompts carry a reference answer, the teacher's mean negative
log-likelihood per generated token, and agreement with the greedy baseline (common prefix,
token F1, exact match).  Speed: tokens per forward pass (the paper's acceleration factor),
tokens per second, wall-clock speed-up over ``greedy`` of the same precision (``speedup``) and
over stock full-precision ``greedy`` (``speedup_vs_fp32_greedy``), the ceiling the measured cost
curve allows, and peak memory.

The teacher: the paper's teacher is the frozen initial checkpoint.  A converted checkpoint does
not carry it, so by default the checkpoint itself, run as a plain next-token LM over real tokens
only (prompt + generated text, no masks), scores every method; pass ``teacher=`` (``--teacher``)
to score with the original model instead.  Both score all methods the same way, so the column
compares methods; only with the original model is it the paper's teacher likelihood.

Reference: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019.
"""

from __future__ import annotations

import copy as copy_module
import datetime as _datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

import attrs
import numpy as np
import torch

from mtp_core import AcceptancePolicy, ConfAdapt, StaticK
from mtp_torch._resources import package_data
from mtp_torch.bench.cost import (
    DEFAULT_K_CANDIDATES,
    CostCurve,
    acceptance_from_histogram,
    auto_policy,
    choose_k_max,
    expected_speedups,
    float_tuple,
    int_tuple,
    measure_cost_curve,
    speedup_ceiling,
)
from mtp_torch.text import cut_at_stop, encode_prompt, stop_token_ids

# The paper's ConfAdapt threshold; its one home is ConfAdapt's own default.
DEFAULT_THRESHOLD: float = ConfAdapt().threshold
# The sweep's defaults, read by bench_methods, BenchConfig and `mtp bench` alike.
_SWEEP_K_MAX: tuple[int | str, ...] = (4, 8, 16)
_SWEEP_THRESHOLDS: tuple[float, ...] = (0.99, 0.95, DEFAULT_THRESHOLD, 0.8, 0.7, 0.6)
_SWEEP_STATIC: tuple[int, ...] = (2, 3)
_SWEEP_VERIFY: tuple[float, ...] = (DEFAULT_THRESHOLD,)
_PROMPT_LOOKUP_TOKENS = 10

__all__ = [
    "BenchConfig",
    "BenchPrompt",
    "MethodSpec",
    "answers_match",
    "bench_methods",
    "common_prefix_length",
    "default_data_path",
    "extract_final_number",
    "format_markdown",
    "gsm8k_reference",
    "load_prompts",
    "plot_report",
    "quantize_int8",
    "run_benchmark",
    "token_f1",
    "write_report",
]

Log = Callable[[str], None]


# --- prompts -----------------------------------------------------------------------------------


@attrs.frozen
class BenchPrompt:
    """One benchmark prompt.

    Attributes:
      text: the prompt as written in the data file (before any chat template).
      input_ids: the prompt's token ids, chat template applied where used.
      reference_answer: the normalised final number of a GSM8K ``answer`` (``"#### 18"``), or
        ``None`` when the row has no such answer.
    """

    text: str
    input_ids: tuple[int, ...] = attrs.field(converter=int_tuple)
    reference_answer: str | None = None


def default_data_path() -> Path:
    """The prompt file ``mtp bench`` reads by default, bundled with the package.

    GSM8K test rows held out from every conversion (three math problems, then one general
    instruction, for the first 48 rows); see ``mtp_torch/data/README.md``.

    Returns:
      The path of ``bench_prompts.jsonl`` inside the installed package.
    """
    return package_data("bench_prompts.jsonl")


def load_prompts(
    path: str | os.PathLike[str],
    tokenizer: Any,
    num_prompts: int | None = None,
    chat: bool = True,
) -> list[BenchPrompt]:
    """Read benchmark prompts from a JSON-lines file.

    Each line is an object with ``question`` (GSM8K style, sent as a chat user turn), ``prompt``
    (an instruction, also sent as a user turn) or ``text`` (raw text continued as is).  A GSM8K
    ``answer`` with a ``#### number`` line (or a bare number) becomes the reference answer.

    Args:
      path: the ``.jsonl`` file.
      tokenizer: the model's tokenizer.
      num_prompts: keep the first this many rows (``None``: all).
      chat: apply the chat template to ``question``/``prompt`` rows when the tokenizer has one.

    Returns:
      The prompts, in file order.

    Raises:
      ValueError: for a line that is not a JSON object or has none of the three fields, or a
        file with no prompt.
    """
    from mtp_torch.training.data import read_jsonl

    if num_prompts is not None and int(num_prompts) < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    prompts: list[BenchPrompt] = []
    for number, row in read_jsonl(path):
        if num_prompts is not None and len(prompts) >= int(num_prompts):
            break
        if isinstance(row.get("question"), str):
            text, use_chat = row["question"], chat
        elif isinstance(row.get("prompt"), str):
            text, use_chat = row["prompt"], chat
        elif isinstance(row.get("text"), str):
            text, use_chat = row["text"], False
        else:
            raise ValueError(
                f"{path}:{number} has no 'question', 'prompt' or 'text' string field; "
                "give each line one of them"
            )
        answer = row.get("answer")
        reference = gsm8k_reference(answer) if answer is not None else None
        prompts.append(
            BenchPrompt(
                text=text,
                input_ids=encode_prompt(tokenizer, text, chat=use_chat),
                reference_answer=reference,
            )
        )
    if not prompts:
        raise ValueError(f'{path} holds no prompt; add lines like {{"question": "..."}}')
    return prompts


# --- quality metrics (pure) ---------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_PHRASE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*[:=]?", flags=re.IGNORECASE
)


def _normalise_number(raw: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; ``"18.00"`` -> ``"18"``; ``None`` if not a number."""
    cleaned = raw.replace("$", "").replace(",", "").replace(" ", "").strip().rstrip(".")
    if not cleaned or cleaned in {"-", "."}:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    found = []
    for match in _NUMBER.finditer(text):
        number = _normalise_number(match.group(0))
        if number is not None:
            found.append(number)
    return found


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a model's (chain-of-thought) response, normalised.

    Looks, in order, for the number after the last ``####``, inside the last ``\\boxed{...}``,
    after the last "answer is" / "answer:" phrase, and finally takes the last number in the
    text.  Currency signs, thousands separators and trailing zeros are dropped.

    Args:
      text: the decoded response.

    Returns:
      The number as a canonical string (``"18"``, ``"-2.5"``), or ``None`` if there is none.

    Example:
      >>> extract_final_number("She makes 9 * 2 = $18 a day.\\n#### 18")
      '18'
      >>> extract_final_number("The answer is $1,234.00.")
      '1234'
    """
    if "####" in text:
        numbers = _numbers(text.rsplit("####", 1)[1])
        if numbers:
            return numbers[0]
    boxed = _BOXED.findall(text)
    if boxed:
        numbers = _numbers(boxed[-1])
        if numbers:
            return numbers[-1]
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        numbers = _numbers(text[phrases[-1].end() :])
        if numbers:
            return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_reference(answer: Any) -> str | None:
    """The normalised reference number of a GSM8K ``answer`` field.

    Args:
      answer: the dataset's answer text (reasoning, then ``#### number``), or a bare number.

    Returns:
      The number as a canonical string, or ``None`` if the answer holds no ``####`` line and is
      not a number itself.
    """
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return _normalise_number(repr(answer)) if math.isfinite(answer) else None
    if not isinstance(answer, str):
        return None
    if "####" in answer:
        numbers = _numbers(answer.rsplit("####", 1)[1])
        return numbers[0] if numbers else None
    return _normalise_number(answer)


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """True when two normalised numbers are equal (within 1e-6 relative)."""
    if predicted is None or reference is None:
        return False
    try:
        a, b = float(predicted), float(reference)
    except ValueError:
        return predicted == reference
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def common_prefix_length(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """Number of leading tokens two sequences share.

    Example:
      >>> common_prefix_length([1, 2, 3, 9], [1, 2, 3, 4, 5])
      3
    """
    length = 0
    for a, b in zip(tokens, reference, strict=False):
        if int(a) != int(b):
            break
        length += 1
    return length


def token_f1(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Bag-of-tokens F1 between a generated sequence and a reference sequence.

    Precision and recall count overlapping tokens with multiplicity (order ignored).  Two empty
    sequences score 1; one empty sequence scores 0.

    Example:
      >>> token_f1([1, 2, 2, 3], [2, 1, 4, 2])
      0.75
    """
    if len(tokens) == 0 and len(reference) == 0:
        return 1.0
    if len(tokens) == 0 or len(reference) == 0:
        return 0.0
    overlap = sum((Counter(int(t) for t in tokens) & Counter(int(t) for t in reference)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(tokens)
    recall = overlap / len(reference)
    return 2.0 * precision * recall / (precision + recall)


# --- methods -----------------------------------------------------------------------------------


def _format_threshold(threshold: float) -> str:
    return f"{float(threshold):g}"


@attrs.frozen
class MethodSpec:
    """One decoding configuration of the benchmark.

    Attributes:
      name: the row name (``greedy``, ``prompt_lookup``, ``static_2``, ``confadapt_0.9_k4``,
        ``verify_confadapt_0.9_k4``; ``_int8`` appended for the quantised copy).
      family: ``"greedy"``, ``"prompt_lookup"``, ``"static"``, ``"confadapt"`` or ``"verify"``.
      precision: ``"base"`` (the model's own dtype) or ``"int8"``.
      policy: the MTP policy (``None`` for the transformers baselines).
      verify: lossless mode.
      threshold: ConfAdapt threshold, if any.
      k_max: positions per step (``k`` of static, ``k_max`` of ConfAdapt), if any.
      k_max_auto: ``k_max`` was chosen by ``auto_policy``.
      prompt_lookup_tokens: ``prompt_lookup_num_tokens`` of the prompt-lookup baseline.
    """

    name: str
    family: str
    precision: str = "base"
    policy: AcceptancePolicy | None = None
    verify: bool = False
    threshold: float | None = None
    k_max: int | None = None
    k_max_auto: bool = False
    prompt_lookup_tokens: int | None = None

    @property
    def is_mtp(self) -> bool:
        """True for methods decoded by ``MTPModel.generate``."""
        return self.policy is not None


def _policy_label(policy: AcceptancePolicy | None) -> str | None:
    if policy is None:
        return None
    if isinstance(policy, ConfAdapt):
        return f"ConfAdapt(threshold={_format_threshold(policy.threshold)}, k_max={policy.k_max})"
    if isinstance(policy, StaticK):
        return f"StaticK({policy.k})"
    return repr(policy)


def bench_methods(
    k_max: Sequence[int | str] = _SWEEP_K_MAX,
    thresholds: Sequence[float] = _SWEEP_THRESHOLDS,
    static: Sequence[int] = _SWEEP_STATIC,
    verify_thresholds: Sequence[float] = _SWEEP_VERIFY,
    prompt_lookup_tokens: int | None = _PROMPT_LOOKUP_TOKENS,
    auto_policies: dict[float, AcceptancePolicy] | None = None,
    precision: str = "base",
    baselines: bool = True,
) -> list[MethodSpec]:
    """The list of methods one precision runs, baselines first.

    Args:
      k_max: ConfAdapt ``k_max`` values; the string ``"auto"`` adds the cost-aware choice
        (resolved per threshold in ``auto_policies``).
      thresholds: ConfAdapt thresholds (paper sweep 0.995 ... 0.6).
      static: ``k`` values of static-k MTP rows (``1`` is MTP's own one-token decoding).
      verify_thresholds: thresholds whose ConfAdapt rows (each ``k_max``) also run lossless.
      prompt_lookup_tokens: candidate tokens of the prompt-lookup baseline; ``None`` skips it.
      auto_policies: ``{threshold: policy}`` chosen by ``auto_policy`` for ``"auto"``.
      precision: ``"base"`` or ``"int8"`` (names get an ``_int8`` suffix).
      baselines: include ``greedy`` (always, when True) and ``prompt_lookup``.

    Returns:
      The method specs, names unique.
    """
    suffix = "" if precision == "base" else f"_{precision}"
    specs: list[MethodSpec] = []
    if baselines:
        specs.append(MethodSpec(name=f"greedy{suffix}", family="greedy", precision=precision))
        if prompt_lookup_tokens is not None:
            specs.append(
                MethodSpec(
                    name=f"prompt_lookup{suffix}",
                    family="prompt_lookup",
                    precision=precision,
                    prompt_lookup_tokens=int(prompt_lookup_tokens),
                )
            )
    for k in static:
        specs.append(
            MethodSpec(
                name=f"static_{int(k)}{suffix}",
                family="static",
                precision=precision,
                policy=StaticK(int(k)),
                k_max=int(k),
            )
        )

    def confadapt_rows(verify: bool, taus: Sequence[float]) -> None:
        prefix = "verify_confadapt" if verify else "confadapt"
        for tau in taus:
            for k in k_max:
                if k == "auto":
                    policy = (auto_policies or {}).get(float(tau))
                    if policy is None:
                        raise ValueError(
                            f"k_max='auto' needs a policy chosen for threshold {tau}; call "
                            "auto_policy first (run_benchmark does) and pass auto_policies"
                        )
                    label, chosen, auto = "auto", int(policy.num_positions), True
                else:
                    policy = ConfAdapt(threshold=float(tau), k_max=int(k))
                    label, chosen, auto = str(int(k)), int(k), False
                specs.append(
                    MethodSpec(
                        name=f"{prefix}_{_format_threshold(tau)}_k{label}{suffix}",
                        family="verify" if verify else "confadapt",
                        precision=precision,
                        policy=policy,
                        verify=verify,
                        threshold=float(tau),
                        k_max=chosen,
                        k_max_auto=auto,
                    )
                )

    confadapt_rows(False, thresholds)
    confadapt_rows(True, verify_thresholds)
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate methods {duplicates}: list each k_max/threshold/k once")
    return specs


def _k_tuple(values: Iterable[int | str]) -> tuple[int | str, ...]:
    """``k_max`` values as a tuple (ints stay ints, ``"auto"`` stays a string)."""
    return tuple(values)


@attrs.frozen
class BenchConfig:
    """What ``run_benchmark`` measures.

    Attributes:
      max_new_tokens: generation budget per prompt.
      k_max: ConfAdapt ``k_max`` values (ints, or ``"auto"`` for the cost-aware choice).
      thresholds: ConfAdapt thresholds.
      static: static-k values.
      verify_thresholds: thresholds also run in the lossless mode (each ``k_max``).
      repeats: timed passes over all prompts per method; speed is the median (one untimed
        warm-up prompt per method first).
      quantize: ``None`` or ``"int8"`` (dynamic int8 Linear layers, CPU only) as an extra
        configuration.
      prompt_lookup_tokens: candidates of the prompt-lookup baseline; ``None`` skips it.
      cost_curve: measure the cost curve of one forward pass (used for ceilings and k choice).
      cost_max_tokens: widest pass measured.
      cost_context: cached tokens in front of the measured pass.
      cost_repeats: timed passes per width.
      auto_candidates: ``k_max`` candidates for ``"auto"``.
      probe_prompts: prompts used to probe acceptance for ``"auto"``.
      probe_tokens: tokens generated per probe prompt.
    """

    max_new_tokens: int = 256
    k_max: tuple[int | str, ...] = attrs.field(default=_SWEEP_K_MAX, converter=_k_tuple)
    thresholds: tuple[float, ...] = attrs.field(default=_SWEEP_THRESHOLDS, converter=float_tuple)
    static: tuple[int, ...] = attrs.field(default=_SWEEP_STATIC, converter=int_tuple)
    verify_thresholds: tuple[float, ...] = attrs.field(default=_SWEEP_VERIFY, converter=float_tuple)
    repeats: int = 1
    quantize: str | None = None
    prompt_lookup_tokens: int | None = _PROMPT_LOOKUP_TOKENS
    cost_curve: bool = True
    cost_max_tokens: int = 32
    cost_context: int = 200
    cost_repeats: int = 5
    auto_candidates: tuple[int, ...] = attrs.field(
        default=DEFAULT_K_CANDIDATES, converter=int_tuple
    )
    probe_prompts: int = 4
    probe_tokens: int = 64

    def __attrs_post_init__(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if int(self.repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        for k in self.k_max:
            if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"k_max values must be integers >= 1 or 'auto', got {k!r}")
        for k in self.static:
            if k < 1:
                raise ValueError(f"static k values must be >= 1, got {k}")
        for tau in (*self.thresholds, *self.verify_thresholds):
            if not 0.0 < tau <= 1.0:
                raise ValueError(f"thresholds must lie in (0, 1], got {tau}")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {self.quantize!r}")
        if self.prompt_lookup_tokens is not None and int(self.prompt_lookup_tokens) < 1:
            raise ValueError(
                f"prompt_lookup_tokens must be >= 1 (or None to skip), got {self.prompt_lookup_tokens}"
            )
        if "auto" in self.k_max and not self.auto_candidates:
            raise ValueError("auto_candidates must hold at least one k_max for k_max='auto'")


# --- measurement helpers -----------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    weight: torch.Tensor = cast(Any, model).get_input_embeddings().weight
    return weight.device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_memory(device: torch.device) -> str:
    """Reset the peak-memory counter; returns what ``_peak_memory_mb`` will report."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    try:  # Linux: writing 5 to clear_refs resets the resident-set high-water mark (VmHWM).
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        if _read_vm_hwm_kb() is not None:
            return "rss_peak"
    except OSError:
        pass
    return "rss_peak_process"  # cannot reset: the process-wide peak so far


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)) / 2**20
    kb = _read_vm_hwm_kb()
    if kb is not None:
        return kb / 1024.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


@contextmanager
def _count_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    """Record the width (new tokens) of every forward call of ``model`` inside the block."""
    widths: list[int] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        del module, output
        tensor = kwargs.get("input_ids")
        if tensor is None and args:
            tensor = args[0]
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
        widths.append(int(tensor.shape[1]) if tensor is not None and tensor.dim() >= 2 else 1)

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield widths
    finally:
        handle.remove()


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8 (CPU only).

    Weights are stored as int8, activations quantised on the fly
    (``torch.ao.quantization.quantize_dynamic``); embeddings stay in full precision.

    Args:
      model: a causal LM on the CPU, in float32.

    Returns:
      The quantised copy (the original is untouched).
    """
    if _model_device(model).type != "cpu":
        raise ValueError(
            "int8 dynamic quantisation runs on the CPU only; drop --quantize int8 or bench on cpu"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        copy = copy_module.deepcopy(model).float().eval()
        quantized: torch.nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            copy, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )
    return quantized


@attrs.define
class _Engine:
    """One precision: the transformers model and its MTP wrapper."""

    precision: str
    hf_model: Any  # a transformers PreTrainedModel (its generate() is untyped)
    mtp_model: Any
    baseline_model: Any = None  # whose generate() the baselines run; None: hf_model


@attrs.define
class _Trace:
    """What one method produced on every prompt (first repeat) and how long each repeat took."""

    generated: list[list[int]] = attrs.field(factory=list)
    forwards: list[int] = attrs.field(factory=list)
    decode_widths: list[int] = attrs.field(factory=list)
    histogram: list[int] = attrs.field(factory=list)
    repeat_seconds: list[float] = attrs.field(factory=list)
    peak_memory_mb: float = 0.0


def _run_once(
    spec: MethodSpec,
    engine: _Engine,
    prompt: BenchPrompt,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
) -> tuple[list[int], list[int], list[int], float]:
    """Decode one prompt; returns generated ids, forward widths, accepted histogram, seconds."""
    from transformers import GenerationConfig

    device = _model_device(engine.hf_model)
    input_ids = torch.tensor([list(prompt.input_ids)], dtype=torch.long, device=device)
    histogram: list[int] = []
    with _count_forwards(engine.hf_model) as widths:
        _synchronize(device)
        start = time.perf_counter()
        if spec.is_mtp:
            out = engine.mtp_model.generate(
                input_ids,
                policy=spec.policy,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids if eos_ids else None,
                verify=spec.verify,
            )
            sequences = out.sequences
            histogram = [int(c) for c in np.asarray(out.accepted_histogram).ravel()]
        else:
            config = GenerationConfig(  # type: ignore[no-untyped-call]
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids if eos_ids else None,
                pad_token_id=pad_id,
                prompt_lookup_num_tokens=spec.prompt_lookup_tokens,
            )
            reference_model = (
                engine.baseline_model if engine.baseline_model is not None else engine.hf_model
            )
            with torch.inference_mode():
                sequences = reference_model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=config,
                )
        _synchronize(device)
        elapsed = time.perf_counter() - start
    generated = cut_at_stop(sequences[0, input_ids.shape[1] :].tolist(), eos_ids)
    return generated, list(widths), histogram, elapsed


def _teacher_scores(
    teacher: torch.nn.Module, prompt: BenchPrompt, generated: Sequence[int]
) -> tuple[float, int, int]:
    """Sum of the teacher's negative log-likelihood over the generated tokens.

    Returns:
      ``(nll_sum, scored_tokens, skipped_tokens)``; tokens outside the teacher's vocabulary
      (e.g. a stray mask token scored by the original model) are skipped and counted.
    """
    if not generated:
        return 0.0, 0, 0
    device = _model_device(teacher)
    vocab = int(cast(Any, teacher).get_output_embeddings().weight.shape[0])
    ids = [*prompt.input_ids, *generated]
    safe = [t if 0 <= t < vocab else 0 for t in ids]
    input_ids = torch.tensor([safe], dtype=torch.long, device=device)
    with torch.inference_mode():
        logits = teacher(input_ids=input_ids).logits[0].float()
    start = len(prompt.input_ids)
    targets = torch.tensor(ids[start:], dtype=torch.long, device=logits.device)
    log_probs = torch.log_softmax(logits[start - 1 : len(ids) - 1], dim=-1)
    inside = (targets >= 0) & (targets < log_probs.shape[-1])
    picked = log_probs.gather(-1, targets.clamp(0, log_probs.shape[-1] - 1)[:, None])[:, 0]
    nll = float(-(picked[inside]).sum())
    scored = int(inside.sum())
    return nll, scored, len(generated) - scored


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _json_float(value: float | None) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


# --- the benchmark -----------------------------------------------------------------------------


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
) -> dict[str, Any]:
    """Run every method on the same prompts and return the report.

    Steps:
      1. Measure the cost curve of one forward pass (if enabled) and resolve ``k_max="auto"``
         per threshold with ``auto_policy`` (probing the first prompts).
      2. Build the methods for the model's own precision, and for an int8 copy if asked.
      3. Warm up every method on the first prompt (untimed).
      4. For each repeat, for each method, decode every prompt one at a time (batch 1), timing
         each call; methods are interleaved so drift spreads evenly.  Outputs and forward
         counts come from the first repeat (decoding is greedy, so repeats are identical).
      5. Score quality (teacher NLL, accuracy, agreement with ``greedy``) outside the timing.
      6. Derive speed (median over repeats), speed-ups and ceilings; summarise.

    Args:
      mtp_model: an ``MTPModel`` (its ``model`` is the transformers model, its ``tokenizer``
        decodes answers for accuracy).
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
      The report: ``{"meta", "cost_curve", "k_max_choice", "methods": [row, ...], "summary"}``;
      each row has ``name``, ``tokens_per_forward``, ``tokens_per_second``, ``speedup``,
      ``speedup_vs_fp32_greedy``, ``accuracy``, ``teacher_nll``, ``agreement_prefix``,
      ``token_f1``, ``peak_memory_mb`` and more (see ``format_markdown``).
    """
    import transformers

    config = BenchConfig() if config is None else config
    say: Log = log if log is not None else (lambda message: None)
    if len(prompts) == 0:
        raise ValueError("no prompts: give at least one BenchPrompt (see load_prompts)")
    hf_model: torch.nn.Module = mtp_model.model
    hf_model.eval()
    device = _model_device(hf_model)
    base_dtype = str(next(hf_model.parameters()).dtype).replace("torch.", "")
    eos_ids = stop_token_ids(None, hf_model, getattr(mtp_model, "tokenizer", None))
    tokenizer = getattr(mtp_model, "tokenizer", None)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0

    # 1. Cost curve and the automatic k_max.
    curve: CostCurve | None = None
    if config.cost_curve:
        say("measuring the cost curve of one forward pass ...")
        curve = measure_cost_curve(
            hf_model,
            max_tokens=config.cost_max_tokens,
            context_length=config.cost_context,
            repeats=config.cost_repeats,
        )
    auto_policies: dict[float, AcceptancePolicy] = {}
    if "auto" in config.k_max:
        candidates = _auto_candidates(config.auto_candidates, mtp_model)
        if curve is None:
            curve = measure_cost_curve(hf_model, max_tokens=max(2 * max(candidates), 2))
        probe = [list(p.input_ids) for p in prompts[: max(int(config.probe_prompts), 1)]]
        for tau in sorted({*config.thresholds, *config.verify_thresholds}):
            policy = auto_policy(
                mtp_model,
                tau,
                candidates=candidates,
                probe_prompts=probe,
                curve=curve,
                max_new_tokens=config.probe_tokens,
                eos_token_id=eos_ids if eos_ids else None,
            )
            auto_policies[float(tau)] = policy
            say(f"k_max=auto at threshold {tau:g}: {_policy_label(policy)}")

    # 2. Methods per precision.
    def methods_for(precision: str) -> list[MethodSpec]:
        return bench_methods(
            k_max=config.k_max,
            thresholds=config.thresholds,
            static=config.static,
            verify_thresholds=config.verify_thresholds if precision == "base" else (),
            prompt_lookup_tokens=config.prompt_lookup_tokens if precision == "base" else None,
            auto_policies=auto_policies,
            precision=precision,
        )

    engines = {"base": _Engine("base", hf_model, mtp_model, baseline_model)}
    specs = methods_for("base")
    if config.quantize == "int8":
        say("quantising Linear layers to int8 (dynamic) ...")
        quantized = quantize_int8(hf_model)
        quantized_mtp = type(mtp_model)(
            quantized, mask_token_id=mtp_model.mask_token_id, tokenizer=tokenizer
        )
        quantized_baseline = None if baseline_model is None else quantize_int8(baseline_model)
        engines["int8"] = _Engine("int8", quantized, quantized_mtp, quantized_baseline)
        specs += methods_for("int8")
    traces = {spec.name: _Trace() for spec in specs}
    max_new = int(config.max_new_tokens)

    # 3. Warm-up (untimed).
    for spec in specs:
        _run_once(spec, engines[spec.precision], prompts[0], max_new, eos_ids, pad_id)

    # 4. Timed repeats, methods interleaved.
    for repeat in range(int(config.repeats)):
        for spec in specs:
            trace = traces[spec.name]
            _reset_peak_memory(device)
            total = 0.0
            for prompt in prompts:
                generated, widths, histogram, seconds = _run_once(
                    spec, engines[spec.precision], prompt, max_new, eos_ids, pad_id
                )
                total += seconds
                if repeat == 0:
                    trace.generated.append(generated)
                    trace.forwards.append(len(widths))
                    trace.decode_widths.extend(widths[1:])
                    if histogram:
                        if len(trace.histogram) < len(histogram):
                            trace.histogram += [0] * (len(histogram) - len(trace.histogram))
                        for n, count in enumerate(histogram):
                            trace.histogram[n] += count
            trace.repeat_seconds.append(total)
            trace.peak_memory_mb = max(trace.peak_memory_mb, _peak_memory_mb(device))
            tokens = sum(len(g) for g in trace.generated)
            say(
                f"[{repeat + 1}/{config.repeats}] {spec.name}: {tokens} tokens in {total:.2f}s "
                f"({tokens / total if total > 0 else float('nan'):.1f} tok/s)"
            )

    # 5. Quality, outside the timing.
    scorer = teacher if teacher is not None else hf_model
    rows: list[dict[str, Any]] = []
    baseline = traces["greedy"].generated
    for spec in specs:
        trace = traces[spec.name]
        same_precision = traces[f"greedy{'' if spec.precision == 'base' else '_' + spec.precision}"]
        nll_sum, scored, skipped = 0.0, 0, 0
        correct, graded = 0, 0
        prefixes, prefix_fractions, f1s, exact = [], [], [], []
        prefixes_same, f1s_same = [], []
        for prompt, generated, reference in zip(prompts, trace.generated, baseline, strict=True):
            nll, count, skip = _teacher_scores(scorer, prompt, generated)
            nll_sum, scored, skipped = nll_sum + nll, scored + count, skipped + skip
            if prompt.reference_answer is not None and tokenizer is not None:
                text = tokenizer.decode(generated, skip_special_tokens=True)
                correct += int(answers_match(extract_final_number(text), prompt.reference_answer))
                graded += 1
            prefix = common_prefix_length(generated, reference)
            prefixes.append(prefix)
            prefix_fractions.append(prefix / len(reference) if reference else 1.0)
            f1s.append(token_f1(generated, reference))
            exact.append(float(list(generated) == list(reference)))
        for generated, reference in zip(trace.generated, same_precision.generated, strict=True):
            prefixes_same.append(common_prefix_length(generated, reference))
            f1s_same.append(token_f1(generated, reference))
        tokens = sum(len(g) for g in trace.generated)
        forwards = sum(trace.forwards)
        seconds = _median(trace.repeat_seconds)
        row: dict[str, Any] = {
            "name": spec.name,
            "family": spec.family,
            "precision": base_dtype if spec.precision == "base" else spec.precision,
            "policy": _policy_label(spec.policy),
            "verify": spec.verify,
            "threshold": spec.threshold,
            "k_max": spec.k_max,
            "k_max_auto": spec.k_max_auto,
            "prompt_lookup_tokens": spec.prompt_lookup_tokens,
            "num_prompts": len(prompts),
            "generated_tokens": tokens,
            "forward_passes": forwards,
            "tokens_per_forward": tokens / forwards if forwards else None,
            "mean_pass_width": _mean(trace.decode_widths),
            "seconds": seconds,
            "seconds_per_repeat": list(trace.repeat_seconds),
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "accuracy": correct / graded if graded else None,
            "num_correct": correct if graded else None,
            "num_graded": graded,
            "teacher_nll": nll_sum / scored if scored else None,
            "teacher_nll_skipped_tokens": skipped,
            "agreement_prefix": _mean(prefixes),
            "agreement_prefix_fraction": _mean(prefix_fractions),
            "exact_match": _mean(exact),
            "token_f1": _mean(f1s),
            "peak_memory_mb": trace.peak_memory_mb,
            "accepted_histogram": trace.histogram or None,
        }
        if spec.precision != "base":
            row["agreement_prefix_same_precision"] = _mean(prefixes_same)
            row["token_f1_same_precision"] = _mean(f1s_same)
        rows.append(row)

    # 6. Speed-ups (same precision, and against stock greedy) and ceilings.
    by_name = {row["name"]: row for row in rows}
    stock = by_name["greedy"]["tokens_per_second"]
    for spec, row in zip(specs, rows, strict=True):
        own = by_name["greedy" if spec.precision == "base" else f"greedy_{spec.precision}"]
        rate = row["tokens_per_second"]
        row["speedup"] = (
            rate / own["tokens_per_second"] if rate and own["tokens_per_second"] else None
        )
        row["speedup_vs_fp32_greedy"] = rate / stock if rate and stock else None
        row["speedup_ceiling"] = None
        if curve is not None and row["tokens_per_forward"]:
            width = row["mean_pass_width"] or row["tokens_per_forward"]
            row["speedup_ceiling"] = speedup_ceiling(row["tokens_per_forward"], curve, width)
    if by_name["greedy"]["speedup"] is not None:
        by_name["greedy"]["speedup"] = 1.0

    report: dict[str, Any] = {
        "meta": {
            "machine": _machine(),
            "device": str(device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "dtype": base_dtype,
            "num_prompts": len(prompts),
            "max_new_tokens": max_new,
            "repeats": int(config.repeats),
            "batch_size": 1,
            "eos_token_ids": eos_ids,
            "teacher": teacher_label
            or "the checkpoint itself as a plain LM over real tokens (original model unavailable)",
            "speedup_definition": (
                "tokens/s over greedy transformers generate of the same precision; "
                "speedup_vs_fp32_greedy: over stock full-precision greedy"
            ),
            **(meta or {}),
        },
        "cost_curve": curve.to_dict() if curve is not None else None,
        "k_max_choice": _k_max_choices(rows, curve),
        "methods": _clean(rows),
        "summary": _summary(rows),
    }
    return report


def _auto_candidates(candidates: Sequence[int], mtp_model: Any) -> tuple[int, ...]:
    """The ``k_max`` candidates of ``"auto"``, capped at the ``k_max`` the model was trained for.

    Mask offsets beyond the trained ``k_max`` were never taught, so probing them only costs
    time; the trained value itself is always a candidate.
    """
    trained = getattr(getattr(mtp_model, "default_policy", None), "k_max", None)
    if not isinstance(trained, int):
        return tuple(int(k) for k in candidates)
    return tuple(sorted({int(k) for k in candidates if int(k) <= trained} | {1, trained}))


def _k_max_choices(rows: Sequence[dict[str, Any]], curve: CostCurve | None) -> list[dict[str, Any]]:
    """Per threshold, the cost-aware ``k_max`` from the widest ConfAdapt row's acceptance."""
    if curve is None:
        return []
    widest: dict[float, dict[str, Any]] = {}
    for row in rows:
        if row["family"] != "confadapt" or row["k_max_auto"] or not row["accepted_histogram"]:
            continue
        if row["name"].endswith("_int8"):
            continue
        tau = float(row["threshold"])
        if tau not in widest or row["k_max"] > widest[tau]["k_max"]:
            widest[tau] = row
    choices = []
    for tau, row in sorted(widest.items(), reverse=True):
        try:
            acceptance = acceptance_from_histogram(row["accepted_histogram"])
        except ValueError:
            continue
        candidates = [k for k in DEFAULT_K_CANDIDATES if k <= row["k_max"]]
        scores = expected_speedups(curve, acceptance, candidates)
        choices.append(
            {
                "threshold": tau,
                "from_method": row["name"],
                "acceptance": acceptance.tolist(),
                "expected_speedup": {str(k): v for k, v in scores.items()},
                "chosen_k_max": choose_k_max(curve, acceptance, candidates),
            }
        )
    return choices


def _clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Non-finite floats become ``None`` so the report is strict JSON."""
    cleaned = []
    for row in rows:
        cleaned.append(
            {
                key: _json_float(value) if isinstance(value, float) else value
                for key, value in row.items()
            }
        )
    return cleaned


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The two headline numbers, kept apart: MTP alone, and the fastest configuration."""

    def pick(candidates: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
        valid = [row for row in candidates if row.get(key) is not None]
        if not valid:
            return None
        best = max(valid, key=lambda row: row[key])
        return {
            "name": best["name"],
            "precision": best["precision"],
            key: best[key],
            "tokens_per_forward": best["tokens_per_forward"],
            "accuracy": best["accuracy"],
            "teacher_nll": best["teacher_nll"],
        }

    base_mtp = [
        row for row in rows if row["policy"] is not None and not row["name"].endswith("_int8")
    ]
    lossless = [row for row in base_mtp if row["verify"]]
    return {
        "mtp_speedup_same_precision": pick(base_mtp, "speedup"),
        "lossless_speedup_same_precision": pick(lossless, "speedup"),
        "fastest_vs_fp32_greedy": pick(list(rows), "speedup_vs_fp32_greedy"),
    }


# --- output ------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_markdown(report: dict[str, Any]) -> str:
    """The report's methods as a Markdown table (plus the summary lines).

    Args:
      report: the output of ``run_benchmark``.

    Returns:
      Markdown text.
    """
    header = (
        "| method | precision | tok/fwd | tok/s | speed-up | vs fp32 greedy | ceiling | "
        "accuracy | teacher NLL | prefix | token F1 | peak MB |"
    )
    lines = [header, "|" + "---|" * 12]
    for row in report["methods"]:
        lines.append(
            "| "
            + " | ".join(
                [
                    row["name"],
                    str(row["precision"]),
                    _fmt(row["tokens_per_forward"]),
                    _fmt(row["tokens_per_second"], 1),
                    _fmt(row["speedup"]),
                    _fmt(row["speedup_vs_fp32_greedy"]),
                    _fmt(row["speedup_ceiling"]),
                    _fmt(row["accuracy"], 3),
                    _fmt(row["teacher_nll"], 3),
                    _fmt(row["agreement_prefix"], 1),
                    _fmt(row["token_f1"], 3),
                    _fmt(row["peak_memory_mb"], 0),
                ]
            )
            + " |"
        )
    summary = report.get("summary") or {}
    notes = []
    best = summary.get("mtp_speedup_same_precision")
    if best:
        notes.append(
            f"MTP alone (same precision as greedy): best {best['name']} at "
            f"{_fmt(best['speedup'])}x, {_fmt(best['tokens_per_forward'])} tokens/forward"
        )
    lossless = summary.get("lossless_speedup_same_precision")
    if lossless:
        notes.append(f"Lossless mode: best {lossless['name']} at {_fmt(lossless['speedup'])}x")
    fastest = summary.get("fastest_vs_fp32_greedy")
    if fastest:
        notes.append(
            f"Fastest configuration vs stock fp32 greedy: {fastest['name']} "
            f"({fastest['precision']}) at {_fmt(fastest['speedup_vs_fp32_greedy'])}x"
        )
    for choice in report.get("k_max_choice") or []:
        notes.append(
            f"Cost-aware k_max at threshold {choice['threshold']:g}: {choice['chosen_k_max']}"
        )
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


_PLOT_FAMILIES = ("greedy", "prompt_lookup", "static", "confadapt", "verify")


def _plot_group_order(item: tuple[tuple[str, Any, str], list[dict[str, Any]]]) -> tuple[Any, ...]:
    """Legend order: base precision first, then baselines, static, ConfAdapt, verify; k rising."""
    family, k, precision = item[0]
    rank = _PLOT_FAMILIES.index(family) if family in _PLOT_FAMILIES else len(_PLOT_FAMILIES)
    return (precision != "base", rank, -1 if k is None else int(k))


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Plot quality against wall-clock speed-up over stock greedy, baselines marked (PNG).

    One panel for the teacher NLL (lower is better) and, when prompts were graded, one for
    accuracy.  ConfAdapt rows are joined per ``k_max`` along the threshold sweep; int8 rows are
    drawn hollow.

    Args:
      report: the output of ``run_benchmark``.
      path: the PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["methods"]
    panels = [("teacher_nll", "teacher NLL per token (lower is better)")]
    if any(row.get("accuracy") is not None for row in rows):
        panels.append(("accuracy", "accuracy"))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    markers = {"greedy": "*", "prompt_lookup": "D", "static": "s", "confadapt": "o", "verify": "^"}
    colors = {
        "greedy": "black",
        "prompt_lookup": "tab:gray",
        "static": "tab:red",
        "verify": "tab:green",
    }
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
        for row in rows:
            if row.get(key) is None or row.get("speedup_vs_fp32_greedy") is None:
                continue
            group = (
                row["family"],
                row["k_max"] if row["family"] in ("confadapt", "verify") else None,
                "int8" if row["name"].endswith("_int8") else "base",
            )
            groups.setdefault(group, []).append(row)
        cmap = plt.get_cmap("viridis")
        ks = sorted({g[1] for g in groups if g[0] in ("confadapt", "verify") and g[1] is not None})
        for (family, k, precision), members in sorted(groups.items(), key=_plot_group_order):
            color: Any = colors.get(family)
            if family in ("confadapt", "verify") and k in ks:
                color = cmap(ks.index(k) / max(len(ks) - 1, 1))
            # Sweeps are joined in threshold order (strict to loose), everything else unjoined.
            members = sorted(members, key=lambda row: -(row["threshold"] or 0.0))
            xs = [row["speedup_vs_fp32_greedy"] for row in members]
            ys = [row[key] for row in members]
            name = family if k is None else f"{family} k_max={k}"
            if precision != "base":
                name += f" ({precision})"
            axis.plot(
                xs,
                ys,
                marker=markers.get(family, "o"),
                markersize=12 if family == "greedy" else 7,
                linestyle="-" if family in ("confadapt", "verify") and len(members) > 1 else "none",
                color=color,
                markerfacecolor="none" if precision != "base" else color,
                label=name,
            )
            for row in members:
                tag = None
                if row["family"] in ("confadapt", "verify") and row["threshold"] is not None:
                    tag = f"{row['threshold']:g}"
                elif row["family"] == "static":
                    tag = f"k={row['k_max']}"
                if tag is not None:
                    axis.annotate(
                        tag,
                        (row["speedup_vs_fp32_greedy"], row[key]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        axis.axvline(1.0, color="black", linewidth=0.6, linestyle=":")
        axis.set_xlabel("wall-clock speed-up over stock greedy generate")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    meta = report.get("meta", {})
    figure.suptitle(
        f"{meta.get('model', 'model')} on {meta.get('device', '?')}: "
        f"{meta.get('num_prompts', '?')} prompts x {meta.get('max_new_tokens', '?')} tokens",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=120)
    plt.close(figure)


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the report as indented, strict JSON (parent directories created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
