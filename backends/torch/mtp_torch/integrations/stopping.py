"""MTP decoding that ends each row at a stop string, and the tokens-per-forward tally it keeps.

Evaluation harnesses stop a continuation at text (``until=["Q:", "\\n\\n"]``), not only at a
stop token.  ``decode_until`` gives ``MTPModel.generate`` a stopping criterion that ends a row
at the token that completes a stop string (reading only a bounded tail of the row's text), so
the engine retires each row at its stop string, stop token or budget, and the decode ends with
the last row: no forward pass is spent past the last stop.  The tally comes from the output's
per-row counts.  It needs nothing from the harness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from mtp_core import AcceptancePolicy
from mtp_torch.decoding.model import GenerateOutput, MTPModel

__all__ = ["DecodeSettings", "GenerationStats", "decode_until"]


@attrs.frozen
class GenerationStats:
    """Totals over the generation requests decoded so far (add two with ``+``).

    A request counts its tokens up to the one that finished it (its stop token, the token that
    completed a stop string, or its budget's last) and the forward passes until then.

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


# The tail a stop-string check decodes, beyond the longest stop string: a few more tokens, and
# a few more characters of context, for decoders whose text at a cut differs from the whole
# text's there (a leading space dropped, a character split across byte tokens).
_TAIL_MARGIN_TOKENS = 4
_TAIL_MARGIN_CHARS = 8


class _StopStrings:
    """A transformers-style stopping criterion: a row ends at the first token after which its
    generated text (special tokens written out) contains one of ``stop_strings``.

    The engine asks after every token, so a stop string first appears in the text the row's
    last token completed: within that token's text and the ``longest - 1`` characters before
    it.  Only a tail of the row is decoded: the longest stop string's tokens plus a margin,
    widened (doubled) until it holds that many characters before the last token, plus a margin;
    the row's whole text is never re-decoded.

    Args:
      tokenizer: turns token ids into text (``decode``).
      stop_strings: the non-empty stop strings.
      prompt_width: width of the (padded) prompts: a row's generated tokens start there.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.prompt_width = prompt_width
        self.context_chars = max(len(text) for text in stop_strings) - 1 + _TAIL_MARGIN_CHARS
        self.window = _TAIL_MARGIN_TOKENS + max(
            len(tokenizer.encode(text, add_special_tokens=False)) for text in stop_strings
        )

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        """``input_ids``: one row, ``(1, prompt_width + n)``; True if it ends after token n."""
        met = self.met(input_ids[0, self.prompt_width :])
        return torch.tensor([met], device=input_ids.device)

    def met(self, generated: torch.Tensor | Sequence[int]) -> bool:
        """Whether the text of ``generated`` contains a stop string, given that the text of
        ``generated[:-1]`` contained none (the check runs after every token)."""
        text = self.tail_text(generated)
        return any(stop in text for stop in self.stop_strings)

    def tail_text(self, generated: torch.Tensor | Sequence[int]) -> str:
        """The text of the tail of ``generated`` that a stop string its last token completed
        must lie in."""
        count = len(generated)
        if count == 0:
            return ""
        last = len(self._decode(generated[count - 1 :]))
        width = min(count, max(self.window, 1))
        while True:
            text = self._decode(generated[count - width :])
            if width == count or len(text) - last >= self.context_chars:
                return text
            width = min(count, 2 * width)

    def _decode(self, tokens: torch.Tensor | Sequence[int]) -> str:
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        text: str = self.tokenizer.decode(ids, skip_special_tokens=False)
        return text


def _stats(out: GenerateOutput) -> GenerationStats:
    """A batch's tally from its ``generate`` output (rows with no pass count none)."""
    lengths, passes = out.num_new_tokens, out.forward_passes_per_row
    decoded = passes > 0
    return GenerationStats(
        num_requests=len(lengths),
        num_generated_tokens=int(lengths.sum()),
        num_forward_passes=int(out.num_forward_passes),
        num_request_passes=int(passes.sum()),
        tokens_per_forward_sum=float((lengths[decoded] / passes[decoded]).sum()),
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
      stop_strings: a row ends at the first token after which its generated text (special
        tokens written out) contains one of them; empty strings are ignored.  The stop tokens
        are those of ``MTPModel.generate`` (the model's ``generation_config.eos_token_id``).
      settings: policy, budget and sampling.

    Returns:
      Per row, the generated token ids up to the token that finished it (a stop token, the
      token that completed a stop string, or the budget's last; the caller cuts the text at the
      stop string), and the batch's ``GenerationStats``.  A finished row leaves the batch, and
      the decode ends with the last row.

    Raises:
      ValueError: for an empty batch, an empty prompt, a prompt that leaves no room for
        ``max_new_tokens`` in the context window (see ``MTPModel.generate``), or stop strings
        with a model that has no tokenizer.
    """
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt of token ids")
    strings = [text for text in stop_strings if text]
    if strings and mtp.tokenizer is None:
        raise ValueError(
            "stop strings need the model's tokenizer to read the generated text: load the "
            "model with its tokenizer (MTPModel(..., tokenizer=...))"
        )
    # 1. Left-pad the prompts into one batch.
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    # 2. Decode; the engine ends each row at its stop token, stop string or budget.
    out = mtp.generate(
        input_ids.to(mtp.backend.device),
        policy=settings.policy,
        max_new_tokens=settings.max_new_tokens,
        attention_mask=attention_mask.to(mtp.backend.device),
        verify=settings.verify,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=settings.seed,
        stopping_criteria=[_StopStrings(mtp.tokenizer, strings, width)] if strings else None,
    )
    # 3. Every row's tokens, and the tally from the output's per-row counts.
    sequences = out.sequences.cpu()
    tokens = [
        sequences[row, width : width + int(count)].tolist()
        for row, count in enumerate(out.num_new_tokens)
    ]
    return tokens, _stats(out)
