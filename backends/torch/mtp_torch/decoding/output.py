"""What ``MTPModel.generate`` returns, and how the engine's per-row result becomes it."""

from __future__ import annotations

import attrs
import numpy as np
import numpy.typing as npt
import torch

from mtp_core import DecodeResult
from mtp_torch.decoding.generation import GenerationPlan

__all__ = ["GenerateOutput", "generate_output"]


@attrs.frozen(eq=False)
class GenerateOutput:
    """What ``MTPModel.generate`` returns.

    Attributes:
      sequences: ``(batch, prompt_len + generated)`` int64 token ids: the prompts as given
        (left padding included), then each row's generated tokens, then ``pad_token_id`` after a
        row finished, like ``transformers``' ``generate``.
      num_forward_passes: model forward calls made for the whole batch.
      tokens_per_forward: generated tokens per forward pass, averaged over rows (the paper's
        acceleration factor).
      accepted_histogram: ``accepted_histogram[n]`` counts row-steps that emitted ``n`` tokens.
      elapsed_s: wall-clock seconds spent decoding.
      first_pass_s: of ``elapsed_s``, the seconds until the first step's tokens: the prompt's
        pass (time to first token).  Per decoding pass after it, a run took
        ``(elapsed_s - first_pass_s) / (num_forward_passes - 1)``: the figure to compare
        policies by, since the prompt's pass costs as much as many one-token passes and a
        policy that takes fewer passes spreads it over fewer.
      num_new_tokens: ``(batch,)`` generated tokens per row (stop token included).
      forward_passes_per_row: ``(batch,)`` forward passes during which each row was still
        decoding (its own acceleration factor is ``num_new_tokens / forward_passes_per_row``).
      stop_reasons: per row, why it ended: ``"stop_token"`` (it emitted an ``eos_token_id``,
        kept as its last token), ``"stop_criterion"`` (a ``stopping_criteria`` or
        ``stop_strings`` ended it at its last token), ``"max_new_tokens"`` (it used its whole
        budget) or ``"max_length"`` (the same, when the budget came from a generation
        config's ``max_length``).  A stop token at a row's last budget token is
        ``"stop_token"``.
    """

    sequences: torch.Tensor
    num_forward_passes: int
    tokens_per_forward: float
    accepted_histogram: npt.NDArray[np.int64]
    elapsed_s: float
    num_new_tokens: npt.NDArray[np.int64]
    forward_passes_per_row: npt.NDArray[np.int64]
    stop_reasons: tuple[str, ...]
    first_pass_s: float = 0.0


def generate_output(
    ids: torch.Tensor,
    result: DecodeResult,
    plan: GenerationPlan,
    elapsed: float,
    first_pass: float = 0.0,
) -> GenerateOutput:
    """The engine's per-row tokens laid out like transformers' ``generate`` output, with each
    row's passes and stop reason (a used-up budget named after what set it)."""
    lengths = np.asarray([len(tokens) for tokens in result.tokens], dtype=np.int64)
    generated = int(lengths.max()) if lengths.size else 0
    width = ids.shape[1] + generated
    sequences = torch.full((ids.shape[0], width), plan.pad_token_id, dtype=torch.long)
    sequences[:, : ids.shape[1]] = ids.cpu()
    for row, tokens in enumerate(result.tokens):
        sequences[row, ids.shape[1] : ids.shape[1] + len(tokens)] = torch.from_numpy(tokens)
    return GenerateOutput(
        sequences=sequences.to(ids.device),
        num_forward_passes=int(result.num_forward_passes),
        tokens_per_forward=float(result.tokens_per_forward),
        accepted_histogram=result.accepted_histogram,
        elapsed_s=elapsed,
        first_pass_s=first_pass,
        num_new_tokens=lengths,
        forward_passes_per_row=np.asarray(result.forward_passes_per_row, dtype=np.int64),
        stop_reasons=tuple(
            plan.budget_limit if reason == "max_new_tokens" else reason
            for reason in result.stop_reasons
        ),
    )
