"""Text handling shared by decoding, training, the benchmark and the CLI: one home each for
prompt encoding, stop-token resolution and cutting a continuation at its stop token."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHAT_TEMPLATE_SECONDS",
    "as_token_ids",
    "chat_prompt",
    "cut_at_stop",
    "decode_utf8",
    "encode_prompt",
    "read_utf8",
    "render_chat_template",
    "stop_token_ids",
]

# The longest a chat template may take to render one conversation (real templates take
# milliseconds); past it rendering stops with an error rather than running on.
CHAT_TEMPLATE_SECONDS = 10.0


def decode_utf8(data: bytes, path: str | os.PathLike[str], offset: int = 0) -> str:
    """``data`` (read from ``path`` at byte ``offset``) as text.

    Raises:
      ValueError: naming the file and the file offset of the first byte that is not UTF-8.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text: byte {offset + error.start} "
            f"(0x{data[error.start]:02x}) is invalid; is it a binary file? Give a UTF-8 "
            ".jsonl or .txt file"
        ) from None


def read_utf8(path: str | os.PathLike[str]) -> str:
    """The whole file as text (``decode_utf8``'s error for a file that is not UTF-8)."""
    with open(path, "rb") as handle:
        return decode_utf8(handle.read(), path)


class _TemplateTimeout(Exception):
    """Raised inside a chat template's rendering when it runs past its time."""


def _deadline_tracer(deadline: float) -> Callable[[FrameType, str, Any], Any]:
    """A trace function that stops the traced thread once ``time.monotonic()`` passes
    ``deadline`` (checked at every call, line and loop turn of Python code)."""

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _TemplateTimeout
        return trace

    return trace


def render_chat_template(tokenizer: Any, messages: Sequence[Any], **kwargs: Any) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)``, bounded in time.

    A template is code from the model's files: one with huge nested loops would render for ever.
    The render is traced in this thread only (a Jinja template compiles to Python, so every loop
    turn is seen) and stopped after ``CHAT_TEMPLATE_SECONDS``.

    Raises:
      ValueError: if the template runs past its time.
    """
    limit = CHAT_TEMPLATE_SECONDS
    previous = sys.gettrace()
    sys.settrace(_deadline_tracer(time.monotonic() + limit))
    try:
        rendered = tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)
    except _TemplateTimeout:
        raise ValueError(
            f"the chat template took more than {limit:g} s to render one conversation (a loop "
            "that does not end?); fix the tokenizer's chat_template or run without the template"
        ) from None
    finally:
        sys.settrace(previous)
    return str(rendered)


def as_token_ids(value: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    """One token id, a list of them or a tensor of them, as a list of ints (``None``: empty).

    Raises:
      TypeError: for token strings, booleans or anything that is not integer ids.
    """
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, (str, bytes, bool)) or not (
        isinstance(value, (Sequence, np.ndarray))
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(
            f"eos_token_id must be a token id or a list of token ids, got {value!r}; convert "
            "token strings with tokenizer.convert_tokens_to_ids"
        )
    return [int(v) for v in value]


def stop_token_ids(
    eos_token_id: int | Sequence[int] | None,
    model: Any,
    tokenizer: Any = None,
) -> list[int]:
    """The ids that end a continuation.

    Args:
      eos_token_id: the caller's stop id(s); used as given when not ``None``.
      model: the transformers model; its ``generation_config.eos_token_id`` is the default, as
        in transformers' ``generate`` (which does not fall back to ``config.eos_token_id``).
      tokenizer: a last resort for callers that must cut text somewhere (the benchmark): its
        ``eos_token_id``.

    Returns:
      The stop ids, possibly empty (decode to the token budget).
    """
    if eos_token_id is not None:
        return as_token_ids(eos_token_id)
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if found is None and tokenizer is not None:
        found = getattr(tokenizer, "eos_token_id", None)
    return as_token_ids(found)


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Generated tokens up to and including the first stop token.

    >>> cut_at_stop([5, 6, 2, 7], [2])
    [5, 6, 2]
    """
    stops = {int(t) for t in stop_ids}
    out: list[int] = []
    for token in tokens:
        out.append(int(token))
        if int(token) in stops:
            break
    return out


def chat_prompt(tokenizer: Any, text: str) -> str | None:
    """``text`` as a user turn of the tokenizer's chat template with the assistant turn opened,
    or ``None`` when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return render_chat_template(
        tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True
    )


def encode_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    """Token ids of a prompt, as a user turn of the chat template when the tokenizer has one.

    Args:
      tokenizer: a transformers tokenizer.
      text: the prompt (a question or an instruction).
      chat: apply the chat template (with the assistant turn opened) if there is one; when
        ``False`` or without a template, the text is tokenized as is (special tokens added).

    Returns:
      The token ids (non-empty).

    Raises:
      ValueError: if the prompt encodes to no tokens.
    """
    rendered = chat_prompt(tokenizer, text) if chat else None
    if rendered is not None:
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError(
            f"the prompt {text[:40]!r} encodes to no tokens; give a non-empty prompt or a "
            "tokenizer that adds a BOS token"
        )
    return ids
