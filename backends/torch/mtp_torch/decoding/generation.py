"""``MTPModel.generate``'s transformers-style arguments, resolved the way transformers does.

``generation_config`` (a ``transformers.GenerationConfig``) supplies what the keyword arguments
leave unset: explicit arguments win over it, and the fields it leaves unset come from the
model's own ``generation_config``, as in transformers.  ``stopping_criteria`` and
``stop_strings`` become one per-row check that the engine asks after every emitted token, so a
row stops at the same token as in transformers' greedy search even when a step emits several.
A ``streamer`` gets the prompt, then each step's new tokens, then ``end()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria

from mtp_core import Sampling
from mtp_torch.text import as_token_ids, stop_token_ids

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GenerationPlan",
    "plan_generation",
    "row_stop_criterion",
    "streaming_callback",
]

DEFAULT_MAX_NEW_TOKENS = 256

# transformers' own values for the sampling fields a GenerationConfig leaves unset.
_TRANSFORMERS_SAMPLING_DEFAULTS: dict[str, float | int] = {
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}
# GenerationConfig fields MTP decoding cannot honour, each with the value that means "off".
_UNSUPPORTED: dict[str, Any] = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "min_length": 0,
    "min_new_tokens": 0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "typical_p": 1.0,
    "min_p": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "guidance_scale": 1.0,
    "max_time": None,
    "prompt_lookup_num_tokens": None,
}

IntArray = npt.NDArray[np.int64]


@attrs.frozen(eq=False)
class GenerationPlan:
    """``generate``'s arguments resolved into what the engine takes.

    Attributes:
      max_new_tokens: generation budget per row.
      stop_ids: token ids that end a row (kept).
      pad_token_id: id written after a row has finished.
      sampling: greedy or sampling settings.
      criteria: a ``transformers.StoppingCriteriaList`` (user criteria and stop strings), or
        ``None`` when there is nothing to check besides ``stop_ids``.
      mask_pad_id: pad id used to infer an attention mask that was not given, or ``None``.
      mask_eos_ids: EOS ids that are never taken for padding when inferring the mask.
      budget_limit: what set ``max_new_tokens``, the stop reason of a row that uses it all:
        ``"max_length"`` when it is a generation config's ``max_length`` less the prompt
        width, else ``"max_new_tokens"``.
    """

    max_new_tokens: int
    stop_ids: list[int]
    pad_token_id: int
    sampling: Sampling
    criteria: Any
    mask_pad_id: int | None
    mask_eos_ids: list[int]
    budget_limit: str = "max_new_tokens"


def plan_generation(
    model: Any,
    prompt_width: int,
    generation_config: Any = None,
    *,
    max_new_tokens: Any = None,
    eos_token_id: Any = None,
    pad_token_id: Any = None,
    temperature: Any = None,
    top_p: Any = None,
    top_k: Any = None,
    stopping_criteria: Any = None,
    stop_strings: Any = None,
    tokenizer: Any = None,
    verify: bool = False,
) -> GenerationPlan:
    """Resolve ``generate``'s arguments: explicit ones, then ``generation_config``, then defaults.

    Without a ``generation_config`` only the stop and pad ids come from the model's own
    generation config (as before it was accepted); decoding is greedy unless ``temperature > 0``.

    Raises:
      TypeError / ValueError: for a ``generation_config`` that is not one or asks for what MTP
        decoding cannot do (beam search, repetition penalty ...), a bad budget, stop strings
        without a tokenizer, or ``verify`` with sampling.
    """
    if generation_config is not None:
        _check_generation_config(generation_config)
    field = _Fields(generation_config, model)
    budget, limit = _budget(max_new_tokens, field, prompt_width)
    eos = eos_token_id if eos_token_id is not None else field("eos_token_id")
    stop_ids = stop_token_ids(eos, model)
    pad = _pad_id(pad_token_id if pad_token_id is not None else field("pad_token_id", True))
    sampling = _sampling(field, temperature, top_p, top_k)
    if verify and not sampling.greedy:
        raise ValueError(
            "verify=True checks proposals against greedy decoding; use temperature 0 with it "
            "(do_sample=False in a generation_config), or verify=False to sample"
        )
    strings = stop_strings if stop_strings is not None else field("stop_strings")
    return GenerationPlan(
        max_new_tokens=budget,
        stop_ids=stop_ids,
        pad_token_id=pad if pad is not None else (stop_ids or [0])[0],
        sampling=sampling,
        criteria=_criteria(stopping_criteria, strings, tokenizer),
        mask_pad_id=pad,
        mask_eos_ids=as_token_ids(field("eos_token_id", model_default=True)),
        budget_limit=limit,
    )


@attrs.frozen
class _Fields:
    """Reads a field the transformers way: the given config's, else the model's, else None."""

    generation_config: Any
    model: Any

    def __call__(self, name: str, model_default: bool = False) -> Any:
        """``model_default``: consult the model's config even without a given one."""
        if self.generation_config is None and not model_default:
            return None
        sources = (self.generation_config, getattr(self.model, "generation_config", None))
        for source in sources:
            value = getattr(source, name, None)
            if value is not None:
                return value
        return None


def _check_generation_config(generation_config: Any) -> None:
    if not isinstance(generation_config, GenerationConfig):
        raise TypeError(
            f"generation_config must be a transformers.GenerationConfig, got "
            f"{type(generation_config).__name__}; build one with GenerationConfig(...)"
        )
    for name, off in _UNSUPPORTED.items():
        value = getattr(generation_config, name, None)
        if value is not None and value != off:
            raise ValueError(
                f"generation_config.{name}={value!r} is not supported by MTP decoding (it "
                "decodes greedily or by sampling, one sequence per prompt); leave it unset"
            )


def _pad_id(value: Any) -> int | None:
    """A pad id as an int (a list of ids, as some configs hold, gives its first)."""
    if value is None:
        return None
    try:
        ids = as_token_ids(value)
    except TypeError:
        ids = []
    if not ids:
        raise TypeError(f"pad_token_id must be a token id, got {value!r}")
    return ids[0]


def _budget(max_new_tokens: Any, field: _Fields, prompt_width: int) -> tuple[int, str]:
    """Explicit ``max_new_tokens``, else the config's (or its ``max_length`` less the prompt),
    and which of the two it is (``"max_new_tokens"`` or ``"max_length"``)."""
    if max_new_tokens is None:
        max_new_tokens = field("max_new_tokens")
    if max_new_tokens is None and field("max_length") is not None:
        max_new_tokens = int(field("max_length")) - prompt_width
        if max_new_tokens <= 0:
            raise ValueError(
                f"generation_config.max_length={field('max_length')} leaves no room after the "
                f"{prompt_width}-token prompt; set max_new_tokens instead"
            )
        return max_new_tokens, "max_length"
    if max_new_tokens is None:
        return DEFAULT_MAX_NEW_TOKENS, "max_new_tokens"
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise TypeError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    return int(max_new_tokens), "max_new_tokens"


def _sampling(field: _Fields, temperature: Any, top_p: Any, top_k: Any) -> Sampling:
    """Explicit settings win; a config with ``do_sample`` fills the rest like transformers."""
    settings: dict[str, Any] = {}
    if field("do_sample"):
        for name, default in _TRANSFORMERS_SAMPLING_DEFAULTS.items():
            value = field(name)
            settings[name] = default if value is None else value
    explicit = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    settings.update({name: value for name, value in explicit.items() if value is not None})
    return Sampling(**settings)


def _criteria(stopping_criteria: Any, stop_strings: Any, tokenizer: Any) -> Any:
    """One ``StoppingCriteriaList`` of the user's criteria and the stop strings, or ``None``."""
    criteria = StoppingCriteriaList()
    if stopping_criteria is not None:
        if callable(stopping_criteria) and not isinstance(stopping_criteria, Sequence):
            stopping_criteria = [stopping_criteria]
        for criterion in stopping_criteria:
            if not callable(criterion):
                raise TypeError(
                    "stopping_criteria must be a StoppingCriteriaList or a list of "
                    f"StoppingCriteria (callables of input_ids and scores), got {criterion!r}"
                )
            criteria.append(criterion)
    if stop_strings is not None:
        strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        if not isinstance(strings, Sequence) or not all(
            isinstance(text, str) and text for text in strings
        ):
            raise TypeError(
                f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}"
            )
        if strings and tokenizer is None:
            raise ValueError(
                "stop_strings need a tokenizer to read the generated text: pass tokenizer=..., "
                "or build the MTPModel with tokenizer=..."
            )
        if strings:
            criteria.append(StopStringCriteria(tokenizer, list(strings)))
    return criteria if len(criteria) else None


def row_stop_criterion(criteria: Any, prompts: torch.Tensor) -> Any:
    """The engine's per-row check calling transformers-style ``criteria``.

    Args:
      criteria: a ``StoppingCriteriaList`` (``None``: no check).
      prompts: ``(batch, prompt_len)`` the prompts as given (left padding included), on the
        device the criteria should see.

    Returns:
      ``stop(row, generated) -> bool``, which calls ``criteria`` with that row's prompt and
      generated tokens as one ``(1, prompt_len + n)`` LongTensor (what transformers' greedy
      search passes for the row after ``n`` tokens) and ``scores=None``; or ``None``.
    """
    if criteria is None:
        return None

    def stop(row: int, generated: IntArray) -> bool:
        new = torch.as_tensor(generated, dtype=torch.long, device=prompts.device)
        sequence = torch.cat([prompts[row], new])[None, :]
        return bool(torch.as_tensor(criteria(sequence, None)).reshape(-1).any())

    return stop


def streaming_callback(streamer: Any, on_chunk: Any) -> Any:
    """``on_chunk`` extended to pass each step's new tokens to ``streamer.put`` (batch size 1)."""
    if streamer is None:
        return on_chunk

    def stream(row: int, tokens: IntArray) -> None:
        streamer.put(torch.tensor(tokens, dtype=torch.long))
        if on_chunk is not None:
            on_chunk(row, tokens)

    return stream
