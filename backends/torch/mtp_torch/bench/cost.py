"""The hardware cost of a forward pass and the cost-aware choice of ``k_max``.

Multi-token decoding trades more tokens per forward pass for wider passes: a ConfAdapt step
with ``k_max`` positions feeds the tokens accepted last step (their keys/values were computed
as masks, so they are fed again) plus ``k_max - 1`` fresh masks.  Whether that pays depends on
how the time of one pass grows with its width ``n`` on the actual hardware: nearly flat on a
GPU at batch 1 (memory bound), roughly linear on a small CPU (compute bound).

This module measures that curve (``measure_cost_curve``), and keeps the arithmetic in pure
functions over it (``speedup_ceiling``, ``expected_speedups``, ``choose_k_max``) so it can be
tested with synthetic curves.  ``auto_policy`` puts the two together: it measures, probes the
model's acceptance on a few prompts, and returns the policy with the best expected tokens per
second, falling back to plain one-token decoding (``StaticK(1)``) when MTP does not pay.

The paper reports acceptance (tokens per pass) and wall-clock separately (Kirchenbauer et al.,
"Multi-Token Prediction via Self-Distillation", arXiv 2602.06019, section on decoding); choosing
``k_max`` from the measured cost of a pass is this project's addition (docs/method.md section 6).
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any, cast

import attrs
import numpy as np
import numpy.typing as npt
import torch
from transformers import DynamicCache

from mtp_core import ConfAdapt, Sampling, StaticK, StepInputs
from mtp_torch.jsonl import float_tuple as float_tuple
from mtp_torch.jsonl import int_tuple as int_tuple
from mtp_torch.text import encode_prompt

__all__ = [
    "COST_CONTEXT_LENGTH",
    "COST_MAX_TOKENS",
    "COST_REPEATS",
    "DEFAULT_K_CANDIDATES",
    "CostCurve",
    "acceptance_from_histogram",
    "auto_policy",
    "choose_k_max",
    "expected_accepted",
    "expected_speedups",
    "float_tuple",
    "int_tuple",
    "measure_cost_curve",
    "monotone_envelope",
    "speedup_ceiling",
]

FloatArray = npt.NDArray[np.float64]

DEFAULT_K_CANDIDATES: tuple[int, ...] = (1, 2, 4, 8, 16)
# How the cost curve is measured by default (``measure_cost_curve``, ``BenchConfig``, ``mtp bench``).
COST_MAX_TOKENS: int = 32
COST_CONTEXT_LENGTH: int = 200
COST_REPEATS: int = 5

# Probe prompts for ``auto_policy`` when the caller gives none: short, varied, like the GSM8K
# chain-of-thought answers the paper measures acceptance on.
_DEFAULT_PROBE_TEXTS: tuple[str, ...] = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?",
    "Write a short paragraph explaining why the sky is blue.",
    "A train travels 60 miles per hour for 3 hours. How far does it travel? Explain step by step.",
    "List three tips for writing clear Python code.",
)


@attrs.frozen
class CostCurve:
    """Median time of one forward pass of ``n`` new tokens against a warm key/value cache.

    Attributes:
      num_tokens: the measured widths ``n`` (tokens fed in one pass), strictly increasing, >= 1,
        and including 1.
      seconds: median wall-clock seconds of one pass at each width, all > 0.
      context_length: cached tokens in front of the measured block.
      device: where it was measured (``"cpu"``, ``"cuda:0"`` ...), for the report.
      measured_seconds: the raw per-width medians (empty when the curve was not measured);
        ``seconds`` equals them for a measured curve, kept apart for the report.
      mask_rows: whether a pass of ``n > 1`` tokens was 1 real token and ``n - 1`` mask tokens
        (a multi-token pass of a mask-gated model, whose adapters act at mask rows only),
        rather than ``n`` real tokens.

    Example:
      >>> curve = CostCurve(num_tokens=(1, 2, 4), seconds=(1.0, 1.5, 2.5))
      >>> curve.time(3)
      2.0
    """

    num_tokens: tuple[int, ...] = attrs.field(converter=int_tuple)
    seconds: tuple[float, ...] = attrs.field(converter=float_tuple)
    context_length: int = 0
    device: str = "unknown"
    measured_seconds: tuple[float, ...] = attrs.field(default=(), converter=float_tuple)
    mask_rows: bool = False

    def __attrs_post_init__(self) -> None:
        if len(self.num_tokens) == 0 or len(self.num_tokens) != len(self.seconds):
            raise ValueError(
                "a cost curve needs one time per width: num_tokens and seconds must be non-empty "
                f"and of equal length, got {len(self.num_tokens)} and {len(self.seconds)}"
            )
        if self.num_tokens[0] != 1:
            raise ValueError(
                "a cost curve must include width 1 (plain one-token decoding is the reference); "
                f"got widths starting at {self.num_tokens[0]}"
            )
        if any(b <= a for a, b in zip(self.num_tokens, self.num_tokens[1:], strict=False)):
            raise ValueError(f"num_tokens must be strictly increasing, got {self.num_tokens}")
        if not all(math.isfinite(s) and s > 0.0 for s in self.seconds):
            raise ValueError(f"seconds must be finite and > 0, got {self.seconds}")

    def time(self, num_tokens: float) -> float:
        """Seconds of one pass of ``num_tokens`` tokens (linear in between and beyond the ends).

        Args:
          num_tokens: pass width, may be fractional (a mean width); must be >= 1.

        Returns:
          Interpolated seconds, never below the smallest measured time.
        """
        if not num_tokens >= 1.0:
            raise ValueError(f"a forward pass feeds at least 1 token, got width {num_tokens}")
        widths = np.asarray(self.num_tokens, dtype=np.float64)
        seconds = np.asarray(self.seconds, dtype=np.float64)
        if len(widths) == 1:
            return float(seconds[0])
        if num_tokens <= widths[-1]:
            return float(np.interp(num_tokens, widths, seconds))
        # Beyond the last width: extend the slope of the last segment (never decreasing).
        slope = max((seconds[-1] - seconds[-2]) / (widths[-1] - widths[-2]), 0.0)
        return float(seconds[-1] + slope * (num_tokens - widths[-1]))

    def relative(self, num_tokens: float) -> float:
        """Cost of a pass of ``num_tokens`` tokens relative to a one-token pass, ``t(n) / t(1)``."""
        return self.time(num_tokens) / self.time(1.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (widths, seconds, relative cost, context length, device, mask rows)."""
        return {
            "num_tokens": list(self.num_tokens),
            "seconds": list(self.seconds),
            "relative": [self.relative(n) for n in self.num_tokens],
            "context_length": self.context_length,
            "device": self.device,
            "measured_seconds": list(self.measured_seconds),
            "mask_rows": self.mask_rows,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostCurve:
        """Rebuild a curve from ``to_dict`` output."""
        return cls(
            num_tokens=data["num_tokens"],
            seconds=data["seconds"],
            context_length=int(data.get("context_length", 0)),
            device=str(data.get("device", "unknown")),
            measured_seconds=data.get("measured_seconds", ()),
            mask_rows=bool(data.get("mask_rows", False)),
        )


def speedup_ceiling(
    tokens_per_forward: float, curve: CostCurve, tokens_per_pass: float | None = None
) -> float:
    """Wall-clock speed-up over one-token decoding if forward passes were the only cost.

    ``tokens_per_forward * t(1) / t(n)``, with ``n`` the mean number of tokens fed per pass.

    Args:
      tokens_per_forward: mean tokens emitted per forward pass (the paper's acceleration factor).
      curve: the measured cost of a pass by width.
      tokens_per_pass: mean width ``n`` of a pass.  ``None`` uses ``tokens_per_forward`` itself,
        the narrowest pass that can emit that many tokens, which bounds every method; for
        ConfAdapt without verification the actual width is about
        ``tokens_per_forward + k_max - 1`` (re-fed accepted tokens plus fresh masks).

    Returns:
      The ceiling (1.0 for plain decoding: one token from a one-token pass).

    Example:
      >>> flat = CostCurve(num_tokens=(1, 32), seconds=(1.0, 1.0))
      >>> speedup_ceiling(3.0, flat, tokens_per_pass=18.0)
      3.0
    """
    if not tokens_per_forward > 0.0:
        raise ValueError(f"tokens_per_forward must be > 0, got {tokens_per_forward}")
    width = tokens_per_forward if tokens_per_pass is None else tokens_per_pass
    width = max(float(width), 1.0)
    return float(tokens_per_forward) / curve.relative(width)


def acceptance_from_histogram(histogram: npt.ArrayLike) -> FloatArray:
    """Per-offset acceptance rates from a histogram of tokens kept per step.

    Args:
      histogram: ``histogram[n]`` = number of steps that kept ``n`` tokens (index 0 is unused
        or 0), as in ``GenerateOutput.accepted_histogram``.

    Returns:
      ``acceptance[j]`` (float64, length ``len(histogram) - 1``) = fraction of steps that kept
      more than ``j`` tokens, i.e. in which offset ``j`` (0-based) was accepted; non-increasing,
      ``acceptance[0] == 1`` when every step kept a token.

    Example:
      >>> acceptance_from_histogram([0, 2, 0, 2]).tolist()
      [1.0, 0.5, 0.5]
    """
    counts = np.asarray(histogram, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(
            "histogram must be 1-D with an entry per count of kept tokens (index n = steps that "
            f"kept n tokens), got shape {counts.shape}"
        )
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError("histogram counts must be finite and >= 0")
    steps = counts[1:].sum()
    if steps <= 0:
        raise ValueError("histogram holds no step that kept a token; probe on more prompts")
    # Steps that kept more than j tokens, j = 0 .. K-1.
    more_than = np.cumsum(counts[1:][::-1])[::-1]
    return np.asarray(more_than / steps, dtype=np.float64)


def _check_acceptance(acceptance: npt.ArrayLike) -> FloatArray:
    rates = np.asarray(acceptance, dtype=np.float64)
    if rates.ndim != 1 or rates.size == 0:
        raise ValueError(
            "acceptance must be a 1-D array of per-offset acceptance rates (acceptance[j] = "
            f"fraction of steps whose offset j was kept), got shape {rates.shape}"
        )
    if not np.all((rates >= 0.0) & (rates <= 1.0)):
        raise ValueError("acceptance rates must lie in [0, 1]")
    if np.any(np.diff(rates) > 1e-9):
        raise ValueError(
            "acceptance rates must be non-increasing (offset j is kept only if every offset "
            "before it is); build them with acceptance_from_histogram"
        )
    return rates


def expected_accepted(acceptance: npt.ArrayLike, k_max: int) -> float:
    """Expected tokens kept per step when only the first ``k_max`` offsets are proposed.

    ConfAdapt keeps a prefix, and the model's outputs at the first ``k`` positions do not depend
    on masks after them (causal attention), so cutting ``k_max`` cuts each step's count at
    ``k_max``: ``E[min(A, k)] = sum_{j < k} acceptance[j]``.  The first token is always kept.
    Offsets beyond the observed ones count as never accepted.

    Args:
      acceptance: per-offset acceptance rates, see ``acceptance_from_histogram``.
      k_max: positions proposed per step, >= 1.

    Returns:
      Expected tokens per step, in ``[1, k_max]``.
    """
    if isinstance(k_max, bool) or int(k_max) < 1:
        raise ValueError(f"k_max must be an integer >= 1, got {k_max!r}")
    rates = _check_acceptance(acceptance)
    head = rates[: int(k_max)].copy()
    head[0] = 1.0
    return float(head.sum())


def expected_speedups(
    curve: CostCurve,
    acceptance: npt.ArrayLike,
    candidates: Sequence[int] = DEFAULT_K_CANDIDATES,
) -> dict[int, float]:
    """Expected tokens/s of ConfAdapt at each ``k_max``, relative to one-token decoding.

    A step keeps ``a = expected_accepted(acceptance, k)`` tokens on average and feeds
    ``a + k - 1`` tokens (the previous step's ``a`` tokens again, plus ``k - 1`` masks), so its
    rate is ``a / t(a + k - 1)`` against ``1 / t(1)`` for plain decoding (``k = 1``).

    Args:
      curve: the cost of a pass by width.
      acceptance: per-offset acceptance rates observed at the largest candidate (or beyond).
      candidates: the ``k_max`` values to score, each >= 1.

    Returns:
      ``{k_max: expected speed-up}``; ``k_max = 1`` maps to 1.0.
    """
    if len(candidates) == 0:
        raise ValueError("candidates must hold at least one k_max value (1 = plain decoding)")
    result: dict[int, float] = {}
    for k in candidates:
        accepted = expected_accepted(acceptance, int(k))
        width = accepted + int(k) - 1
        result[int(k)] = accepted / curve.relative(width)
    return result


def choose_k_max(
    curve: CostCurve,
    acceptance: npt.ArrayLike,
    candidates: Sequence[int] = DEFAULT_K_CANDIDATES,
    min_speedup: float = 1.0,
) -> int:
    """The ``k_max`` with the best expected tokens/s on this hardware; 1 when MTP does not pay.

    Args:
      curve: the cost of a pass by width (``measure_cost_curve``).
      acceptance: per-offset acceptance rates (``acceptance_from_histogram`` of a probe run).
      candidates: ``k_max`` values to consider.
      min_speedup: a candidate above 1 is chosen only if its expected speed-up over one-token
        decoding is at least this (a margin for the decode loop's own overhead, which the
        curve does not see).

    Returns:
      The chosen ``k_max``; ties go to the smaller value.

    Example:
      >>> steep = CostCurve(num_tokens=(1, 32), seconds=(1.0, 32.0))
      >>> choose_k_max(steep, [1.0, 0.5, 0.25])
      1
    """
    if not min_speedup > 0.0:
        raise ValueError(f"min_speedup must be > 0, got {min_speedup}")
    scores = expected_speedups(curve, acceptance, candidates)
    best_k, best = 1, 1.0
    for k in sorted(scores):
        if k == 1:
            continue
        if scores[k] >= min_speedup and scores[k] > best + 1e-12:
            best_k, best = k, scores[k]
    return best_k


# --- measurement (torch) ----------------------------------------------------------------------


def _model_pass(model: Any, context: Any, blocks: Any) -> Any:
    """Prefill ``context`` through ``model``; return ``one_pass(n)`` timing a block of ``n``."""
    parameters = inspect.signature(model.forward).parameters
    cache_argument = "cache" if "cache" in parameters else "past_key_values"
    cache = DynamicCache()
    model(input_ids=context, use_cache=True, **{cache_argument: cache})
    length, device = int(context.shape[1]), context.device

    def one_pass(n: int) -> float:
        positions = torch.arange(length, length + n, device=device)
        _synchronize(device)
        start = time.perf_counter()
        model(
            input_ids=blocks[:, :n],
            position_ids=positions[None, :],
            use_cache=True,
            **{cache_argument: cache},
        )
        _synchronize(device)
        elapsed = time.perf_counter() - start
        cache.crop(-n)
        return elapsed

    return one_pass


def _backend_pass(backend: Any, context: Any, blocks: Any) -> Any:
    """Prefill ``context`` through ``backend``; return ``one_pass(n)`` timing a block of ``n``."""
    length = int(context.shape[1])
    state = {"cache": backend.new_cache(1)}

    def step(ids: np.ndarray, past: int) -> None:
        width = int(ids.shape[1])
        inputs = StepInputs(
            token_ids=ids,
            position_ids=np.arange(past, past + width, dtype=np.int64)[None, :],
            attention_mask=np.ones((1, past + width), dtype=bool),
            read_index=np.arange(width, dtype=np.int64)[None, :],
        )
        _, state["cache"] = backend.forward(state["cache"], inputs, Sampling(), 0)

    step(context.cpu().numpy().astype(np.int64), 0)
    block_ids = blocks.cpu().numpy().astype(np.int64)

    def one_pass(n: int) -> float:
        start = time.perf_counter()
        step(np.ascontiguousarray(block_ids[:, :n]), length)  # the read-out syncs the device
        elapsed = time.perf_counter() - start
        state["cache"] = backend.crop(state["cache"], length)
        return elapsed

    return one_pass


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cost_curve(
    model: torch.nn.Module,
    max_tokens: int = COST_MAX_TOKENS,
    context_length: int = COST_CONTEXT_LENGTH,
    repeats: int = COST_REPEATS,
    warmup: int = 1,
    seed: int = 0,
    backend: Any = None,
    mask_token_id: int | None = None,
) -> CostCurve:
    """Time one forward pass of ``n = 1 .. max_tokens`` tokens after a warm cache.

    A random context of ``context_length`` tokens is prefilled once; each timed pass feeds ``n``
    random tokens at the following positions and the cache is cropped back afterwards.  Widths
    are interleaved within each repeat so drift (clock boost, other processes) spreads evenly;
    each width's time is the median over ``repeats``.

    Args:
      model: a transformers causal LM (``MTPModel.model``), on the device to measure.
      max_tokens: largest width measured.
      context_length: cached tokens before the block (about a prompt's length).
      repeats: timed passes per width (median taken).
      warmup: untimed passes per width first.
      seed: seed of the random token ids.
      backend: a decoding backend (``MTPModel.decoding_backend()``) to time instead of the
        model's own forward: a pass is then exactly what ``generate`` runs (its cache, its
        compiled pass if any, the read-out of every position of the block).
      mask_token_id: when given, a block of ``n`` is one real token and ``n - 1`` of this mask
        token, the shape of a ConfAdapt step after one kept token.  For a mask-gated model this
        is what its multi-token passes cost (the adapters act at mask rows only; a block of
        real tokens would leave them out).

    Returns:
      The ``CostCurve``; its ``seconds`` are the per-width medians (also in
      ``measured_seconds``; ``monotone_envelope`` smooths them where a caller wants that).
    """
    if int(max_tokens) < 1 or int(context_length) < 1 or int(repeats) < 1 or int(warmup) < 0:
        raise ValueError(
            "max_tokens, context_length and repeats must be >= 1 and warmup >= 0, got "
            f"{max_tokens}, {context_length}, {repeats}, {warmup}"
        )
    parameter = next(model.parameters())
    device = parameter.device
    vocab_size = int(cast(Any, model).get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(int(seed))
    context = torch.randint(0, vocab_size, (1, int(context_length)), generator=generator)
    blocks = torch.randint(0, vocab_size, (1, int(max_tokens)), generator=generator)
    if mask_token_id is not None:  # real tokens stay real: a drawn mask id becomes another id
        mask = int(mask_token_id)
        other = (mask + 1) % vocab_size
        context = torch.where(context == mask, other, context)
        blocks = torch.where(blocks == mask, other, blocks)
        blocks[:, 1:] = mask
    context, blocks = context.to(device), blocks.to(device)
    widths = list(range(1, int(max_tokens) + 1))
    times: dict[int, list[float]] = {n: [] for n in widths}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if backend is None:
                one_pass = _model_pass(model, context, blocks)
            else:
                one_pass = _backend_pass(backend, context, blocks)
            for n in widths:
                for _ in range(int(warmup)):
                    one_pass(n)
            for _ in range(int(repeats)):
                for n in widths:
                    times[n].append(one_pass(n))
    finally:
        model.train(was_training)
    measured = [max(statistics.median(times[n]), 1e-9) for n in widths]
    return CostCurve(
        num_tokens=widths,
        # The raw medians, not their monotone envelope: on some BLAS a narrower pass is truly
        # slower than a wider one (stock PyTorch on the development CPU: 2-3 tokens cost more
        # than 4-5), and decoding does not pad a pass to a cheaper width, so a pass of n tokens
        # costs what n measured.
        seconds=measured,
        context_length=int(context_length),
        device=str(device),
        measured_seconds=measured,
        mask_rows=mask_token_id is not None and int(max_tokens) > 1,
    )


def monotone_envelope(seconds: Sequence[float]) -> list[float]:
    """The largest non-decreasing curve below the measured times (a running minimum from the right).

    For smoothing a noisy curve under the assumption that a wider pass never costs less (it
    does at least the work of a narrower one): a width that measured slower than a wider one
    is lowered to the wider one's, so upward spikes vanish and genuine steps stay.  Not every
    BLAS honours the assumption (``measure_cost_curve`` keeps the raw medians for that reason).

    Args:
      seconds: median seconds per width, in increasing width order.

    Returns:
      Seconds with ``out[i] = min(seconds[i:])``.

    Example:
      >>> monotone_envelope([1.0, 5.0, 1.2, 2.0])
      [1.0, 1.2, 1.2, 2.0]
    """
    result = [float(s) for s in seconds]
    for index in range(len(result) - 2, -1, -1):
        result[index] = min(result[index], result[index + 1])
    return result


def _probe_prompt_ids(mtp_model: Any, probe_prompts: Sequence[Any] | None) -> list[list[int]]:
    """Token ids of the probe prompts (strings go through the model's tokenizer)."""
    prompts: Sequence[Any] = _DEFAULT_PROBE_TEXTS if probe_prompts is None else probe_prompts
    if len(prompts) == 0:
        raise ValueError("probe_prompts is empty: give a few prompts (strings or token id lists)")
    tokenizer = getattr(mtp_model, "tokenizer", None)
    result: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(
                    "string probe prompts need a tokenizer: load the model with one "
                    "(MTPModel.from_pretrained) or pass token id lists as probe_prompts"
                )
            result.append(encode_prompt(tokenizer, prompt, chat=True))
        else:
            raw = prompt.tolist() if hasattr(prompt, "tolist") else prompt
            ids = [int(t) for t in np.asarray(raw).ravel()]
            if not ids:
                raise ValueError("a probe prompt is empty; give at least one token id")
            result.append(ids)
    return result


def auto_policy(
    mtp_model: Any,
    threshold: float = ConfAdapt().threshold,
    candidates: Sequence[int] = DEFAULT_K_CANDIDATES,
    probe_prompts: Sequence[Any] | None = None,
    *,
    curve: CostCurve | None = None,
    max_new_tokens: int = 64,
    min_speedup: float = 1.05,
    eos_token_id: int | list[int] | None = None,
) -> ConfAdapt | StaticK:
    """Pick ConfAdapt's ``k_max`` for this model on this hardware (``k_max="auto"``).

    1. Measure the cost curve of the model's forward pass (unless ``curve`` is given).
    2. Decode the probe prompts with ``ConfAdapt(threshold, max(candidates))`` and turn the
       histogram of kept tokens into per-offset acceptance rates.
    3. Score every candidate with ``expected_speedups`` and keep the best; when none beats
       one-token decoding by ``min_speedup``, return ``StaticK(1)`` (plain decoding).

    Args:
      mtp_model: an ``MTPModel`` (its ``model`` is timed, its ``generate`` probed).
      threshold: ConfAdapt confidence threshold in ``(0, 1]``.
      candidates: ``k_max`` values to consider (1 = plain decoding).
      probe_prompts: strings (tokenized with the model's tokenizer, chat template applied when
        it has one) or token id sequences; ``None`` uses a few built-in prompts.
      curve: a measured cost curve to reuse; ``None`` measures one (a few seconds).
      max_new_tokens: tokens generated per probe prompt.
      min_speedup: minimum expected speed-up to prefer MTP over plain decoding.
      eos_token_id: stop token(s) for the probe; ``None`` uses the model's default.

    Returns:
      ``ConfAdapt(threshold, k_max)`` with the chosen ``k_max``, or ``StaticK(1)``.
    """
    if len(candidates) == 0 or any(int(k) < 1 for k in candidates):
        raise ValueError(f"candidates must be k_max values >= 1, got {tuple(candidates)}")
    probe_policy = ConfAdapt(threshold=threshold, k_max=max(int(k) for k in candidates))
    if curve is None:
        curve = measure_cost_curve(mtp_model.model, max_tokens=max(2 * probe_policy.k_max, 2))
    histogram = np.zeros(probe_policy.k_max + 1, dtype=np.float64)
    device = next(mtp_model.model.parameters()).device
    for ids in _probe_prompt_ids(mtp_model, probe_prompts):
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        out = mtp_model.generate(
            input_ids,
            policy=probe_policy,
            max_new_tokens=int(max_new_tokens),
            eos_token_id=eos_token_id,
        )
        counts = np.asarray(out.accepted_histogram, dtype=np.float64).ravel()
        size = min(counts.size, histogram.size)
        histogram[:size] += counts[:size]
    acceptance = acceptance_from_histogram(histogram)
    k_max = choose_k_max(curve, acceptance, candidates, min_speedup=min_speedup)
    if k_max == 1:
        return StaticK(1)
    return ConfAdapt(threshold=threshold, k_max=k_max)
