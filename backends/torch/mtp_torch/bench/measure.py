"""Measuring one decode: time, forward passes, peak memory; the int8 copy; the teacher's score.

``timed_decode`` runs one method on one prompt and records what the benchmark reports about
it (generated ids cut at the stop token, the width of every forward pass, the accepted-token
histogram, seconds); ``Trace`` collects those over prompts and repeats.  Peak memory is CUDA's
allocator peak on a GPU, else the resident-set high-water mark (reset per method where Linux
allows).  ``resource`` (Unix only) is imported only where the fallback needs it.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import attrs
import torch

from mtp_torch.bench.methods import BenchMethod, ModelsUnderTest, RunSettings
from mtp_torch.bench.prompts import BenchPrompt
from mtp_torch.bench.quality import TeacherNLL
from mtp_torch.decoding.fused import observe_passes
from mtp_torch.decoding.kernels import use_kernels
from mtp_torch.decoding.native import cpu_isa, cpu_model
from mtp_torch.text import cut_at_stop

__all__ = [
    "Decoded",
    "Trace",
    "count_forwards",
    "load_average",
    "machine_info",
    "median",
    "model_device",
    "peak_memory_mb",
    "quantize_int8",
    "reset_peak_memory",
    "synchronize",
    "teacher_nll",
    "timed_decode",
]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's input embeddings."""
    weight: torch.Tensor = cast(Any, model).get_input_embeddings().weight
    return weight.device


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op elsewhere), so a clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return float(statistics.median(values)) if values else float("nan")


# --- memory ------------------------------------------------------------------------------------


def _read_vm_hwm_kb() -> int | None:
    """Linux's resident-set high-water mark of this process (kB), or ``None`` elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_memory(device: torch.device) -> str:
    """Reset the peak-memory counter; returns what ``peak_memory_mb`` will report."""
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory`` (MiB): CUDA allocated, else resident set."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)) / 2**20
    kb = _read_vm_hwm_kb()
    if kb is not None:
        return kb / 1024.0
    import resource  # Unix only; the last resort

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


# --- forward passes and timing ------------------------------------------------------------------


@contextmanager
def count_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
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


@attrs.frozen
class Decoded:
    """One timed decode of one prompt.

    Attributes:
      generated: the generated ids (prompt excluded), cut at the first stop token.
      widths: the width of every forward pass of the method's model, prefill first.
      accepted_histogram: ``[n]`` counts steps that kept ``n`` tokens (empty for baselines).
      seconds: wall-clock seconds of the ``generate`` call.
    """

    generated: list[int]
    widths: list[int]
    accepted_histogram: tuple[int, ...]
    seconds: float


def timed_decode(
    method: BenchMethod, models: ModelsUnderTest, prompt: BenchPrompt, settings: RunSettings
) -> Decoded:
    """Decode one prompt with ``method``, counting the forward passes of the model it runs.

    Args:
      method: the method.
      models: the models of the method's precision.
      prompt: the prompt (batch 1).
      settings: budget, stop and pad tokens.

    Returns:
      What the decode produced and how long it took.
    """
    device = model_device(models.hf_model)
    input_ids = torch.tensor([list(prompt.input_ids)], dtype=torch.long, device=device)
    # The transformers baselines may run another model (--baseline): count both, since only
    # one of them runs for any method.
    baseline = models.reference_model
    with contextlib.ExitStack() as stack:
        if models.kernel is not None:
            stack.enter_context(use_kernels(models.kernel, models.hf_model, baseline))
        widths = stack.enter_context(count_forwards(models.hf_model))
        fused_widths = stack.enter_context(observe_passes())  # passes that bypass forward()
        baseline_widths = (
            stack.enter_context(count_forwards(baseline)) if baseline is not models.hf_model else []
        )
        synchronize(device)
        start = time.perf_counter()
        out = method.generate(models, input_ids, settings)
        synchronize(device)
        elapsed = time.perf_counter() - start
    generated = cut_at_stop(out.sequences[0, input_ids.shape[1] :].tolist(), settings.eos_token_ids)
    all_widths = [*widths, *fused_widths, *baseline_widths]
    return Decoded(generated, all_widths, out.accepted_histogram, elapsed)


@attrs.define
class Trace:
    """What one method produced on every prompt (first repeat) and how long each repeat took.

    Attributes:
      generated: generated ids per prompt.
      forwards: forward passes per prompt.
      decode_widths: widths of every pass after each prompt's prefill.
      histogram: accepted-token histogram summed over prompts.
      repeat_seconds: seconds to decode all prompts, per repeat.
      peak_memory_mb: the highest peak memory over repeats.
    """

    generated: list[list[int]] = attrs.field(factory=list)
    forwards: list[int] = attrs.field(factory=list)
    decode_widths: list[int] = attrs.field(factory=list)
    histogram: list[int] = attrs.field(factory=list)
    repeat_seconds: list[float] = attrs.field(factory=list)
    peak_memory_mb: float = 0.0

    def record(self, decoded: Decoded) -> None:
        """Keep one prompt's outputs (decoding is greedy, so one repeat's are enough)."""
        self.generated.append(decoded.generated)
        self.forwards.append(len(decoded.widths))
        self.decode_widths.extend(decoded.widths[1:])
        histogram = decoded.accepted_histogram
        if len(self.histogram) < len(histogram):
            self.histogram += [0] * (len(histogram) - len(self.histogram))
        for n, count in enumerate(histogram):
            self.histogram[n] += count


# --- the int8 copy and the teacher --------------------------------------------------------------


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8 (CPU only).

    Weights are stored as int8, activations quantised on the fly
    (``torch.ao.quantization.quantize_dynamic``); embeddings stay in full precision.

    Args:
      model: a causal LM on the CPU, in float32.

    Returns:
      The quantised copy (the original is untouched).

    Raises:
      ValueError: for a model that is not on the CPU.
    """
    if model_device(model).type != "cpu":
        raise ValueError(
            "int8 dynamic quantisation runs on the CPU only; drop --quantize int8 or bench on cpu"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Lazy, under catch_warnings: importing torch.ao.quantization warns of its deprecation.
        from torch.ao.quantization import quantize_dynamic

        copy = copy_module.deepcopy(model).float().eval()
        quantized: torch.nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            copy, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )
    return quantized


def teacher_nll(
    teacher: torch.nn.Module, prompt: BenchPrompt, generated: Sequence[int]
) -> TeacherNLL:
    """The teacher's negative log-likelihood of the generated tokens after the prompt.

    The teacher runs as a plain next-token LM over real tokens only (prompt + generated, no
    masks).  Tokens outside its vocabulary (e.g. a stray mask token scored by the original
    model) are skipped and counted.

    Args:
      teacher: a transformers causal LM.
      prompt: the prompt.
      generated: the generated ids.

    Returns:
      The summed NLL (nats), tokens scored and tokens skipped.
    """
    if not generated:
        return TeacherNLL(0.0, 0, 0)
    device = model_device(teacher)
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
    scored = int(inside.sum())
    return TeacherNLL(float(-(picked[inside]).sum()), scored, len(generated) - scored)


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none): work already on the CPU."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows
        return None


def machine_info() -> dict[str, Any]:
    """The machine the benchmark ran on, for the report's ``meta``: the CPU's model and the
    ISA flags its figures depend on, the threads, and the load already on it at the start."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "isa": " ".join(cpu_isa()),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info
