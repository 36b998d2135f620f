"""MTP decoding that ends each row at a stop string, and the tokens-per-forward tally it keeps.

Evaluation harnesses stop a continuation at text (``until=["Q:", "\\n\\n"]``), not only at a
stop token.  ``decode_until`` watches every row's text as the decoder emits it and ends the
batch's decode as soon as every row has met a stop string, a stop token or its budget, so no
forward pass is spent past the last stop.  It needs nothing from the harness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import torch

from mtp_core import AcceptancePolicy
from mtp_torch.decoding.model import MTPModel
from mtp_torch.text import stop_token_ids

__all__ = ["DecodeSettings", "GenerationStats", "decode_until"]


@attrs.frozen
class GenerationStats:
    """Totals over the generation requests decoded so far (add two with ``+``).

    A request counts the tokens and forward passes up to the step that finished it: the step
    that emitted its stop token, the one whose tokens completed a stop string (the tokens of that
    step past the stop string included), or the one that reached its budget.

    Attributes:
      num_requests: requests decoded.
      num_generated_tokens: tokens emitted until each request finished, summed.
      num_forward_passes: batched model forward calls (one call serves a whole batch).
      num_request_passes: forward passes during which each request was decoding, summed.
      tokens_per_forward_sum: each request's tokens divided by its forward passes, summed.
    """

    num_requests: int = 0
    num_generated_tokens: int = 0
    num_forward_passes: int = 0
    num_request_passes: int = 0
    tokens_per_forward_sum: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass, averaged over requests (0.0 before any)."""
        return self.tokens_per_forward_sum / self.num_requests if self.num_requests else 0.0

    def __add__(self, other: GenerationStats) -> GenerationStats:
        return GenerationStats(
            *(
                mine + theirs
                for mine, theirs in zip(attrs.astuple(self), attrs.astuple(other), strict=True)
            )
        )

    def as_dict(self) -> dict[str, float | int]:
        """The totals and the mean ``tokens_per_forward``, as plain numbers (for JSON)."""
        return {**attrs.asdict(self), "tokens_per_forward": self.tokens_per_forward}


@attrs.frozen
class DecodeSettings:
    """How ``decode_until`` decodes one batch.

    Attributes:
      policy: the acceptance policy (``StaticK``, ``ConfAdapt`` ...).
      max_new_tokens: generation budget per row.
      verify: lossless mode (the output equals greedy decoding).
      temperature: 0 for greedy, else the sampling temperature.
      top_p: nucleus mass kept when sampling.
      top_k: keep only the k most likely tokens when sampling (0: all).
      seed: seed of the sampling draws.
    """

    policy: AcceptancePolicy
    max_new_tokens: int
    verify: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


class _EveryRowFinished(Exception):
    """Raised from the chunk callback to end a decode whose rows are all finished."""


class _RowWatch:
    """The ``on_chunk`` callback of one batch: each row's tokens and passes until it finished."""

    def __init__(
        self,
        tokenizer: Any,
        stop_strings: Sequence[str],
        stop_ids: Sequence[int],
        num_rows: int,
        budget: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [text for text in stop_strings if text]
        self.stop_ids = {int(token) for token in stop_ids}
        self.budget = budget
        self.tokens: list[list[int]] = [[] for _ in range(num_rows)]
        self.passes = np.zeros(num_rows, dtype=np.int64)  # until the row finished
        self.chunks = np.zeros(num_rows, dtype=np.int64)  # all the row's steps
        self.finished = np.zeros(num_rows, dtype=np.bool_)

    def __call__(self, row: int, chunk: npt.NDArray[np.int64]) -> None:
        # Every step emits at least one token for each row still decoding, so a row's chunks
        # count the forward passes it took part in.
        self.chunks[row] += 1
        if self.finished[row]:
            return  # decoding past its stop string while other rows go on
        self.tokens[row].extend(int(token) for token in chunk)
        self.passes[row] += 1
        self.finished[row] = (
            int(chunk[-1]) in self.stop_ids
            or len(self.tokens[row]) >= self.budget
            or self._meets_stop_string(row)
        )
        if self.finished.all():
            raise _EveryRowFinished

    def _meets_stop_string(self, row: int) -> bool:
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=False)
        return any(stop in text for stop in self.stop_strings)

    def stats(self) -> GenerationStats:
        """The batch's tally (rows with no step, from a zero budget, count no passes)."""
        decoded = self.passes > 0
        lengths = np.asarray([len(tokens) for tokens in self.tokens], dtype=np.int64)
        return GenerationStats(
            num_requests=len(self.tokens),
            num_generated_tokens=int(lengths.sum()),
            num_forward_passes=int(self.chunks.max(initial=0)),
            num_request_passes=int(self.passes.sum()),
            tokens_per_forward_sum=float((lengths[decoded] / self.passes[decoded]).sum()),
        )


def decode_until(
    mtp: MTPModel,
    prompts: Sequence[Sequence[int]],
    stop_strings: Sequence[str],
    settings: DecodeSettings,
) -> tuple[list[list[int]], GenerationStats]:
    """Decode a batch of prompts with MTP until each row meets a stop token, string or budget.

    Args:
      mtp: the model; its tokenizer turns tokens into text to look for the stop strings.
      prompts: per row, the prompt's token ids (no padding; lengths may differ).
      stop_strings: a row is finished once its generated text (special tokens written out)
        contains one of them; empty strings are ignored.  The stop tokens are those of
        ``MTPModel.generate`` (the model's ``generation_config.eos_token_id``).
      settings: policy, budget and sampling.

    Returns:
      Per row, the generated token ids up to the step that finished it (the caller cuts the
      text at the stop string), and the batch's ``GenerationStats``.

    Raises:
      ValueError: for an empty batch, an empty prompt or a prompt that leaves no room for
        ``max_new_tokens`` in the context window (see ``MTPModel.generate``).
    """
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt of token ids")
    # 1. Left-pad the prompts into one batch.
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    watch = _RowWatch(
        mtp.tokenizer,
        stop_strings,
        stop_token_ids(None, mtp.model),
        len(prompts),
        settings.max_new_tokens,
    )
    # 2. Decode; the watch ends the decode once every row is finished.
    try:
        mtp.generate(
            input_ids.to(mtp.backend.device),
            policy=settings.policy,
            max_new_tokens=settings.max_new_tokens,
            attention_mask=attention_mask.to(mtp.backend.device),
            verify=settings.verify,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=settings.seed,
            on_chunk=watch,
        )
    except _EveryRowFinished:
        pass
    # 3. Every row's tokens until it finished, and the tally.
    return watch.tokens, watch.stats()
