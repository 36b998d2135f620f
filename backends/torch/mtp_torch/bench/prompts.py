"""The benchmark's prompts: the bundled prompt file and the JSON-lines reader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from mtp_torch._resources import package_data
from mtp_torch.bench.cost import int_tuple
from mtp_torch.bench.quality import gsm8k_reference
from mtp_torch.jsonl import read_jsonl
from mtp_torch.text import encode_prompt

__all__ = ["BenchPrompt", "default_data_path", "load_prompts"]


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


def _prompt_text(row: dict[str, Any], chat: bool) -> tuple[str, bool] | None:
    """The row's prompt and whether it is sent as a chat turn; ``None`` if it has none."""
    for field, as_chat in (("question", chat), ("prompt", chat), ("text", False)):
        if isinstance(row.get(field), str):
            return row[field], as_chat
    return None


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
    if num_prompts is not None and int(num_prompts) < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    prompts: list[BenchPrompt] = []
    for number, row in read_jsonl(path):
        if num_prompts is not None and len(prompts) >= int(num_prompts):
            break
        found = _prompt_text(row, chat)
        if found is None:
            raise ValueError(
                f"{path}:{number} has no 'question', 'prompt' or 'text' string field; "
                "give each line one of them"
            )
        text, use_chat = found
        answer = row.get("answer")
        prompts.append(
            BenchPrompt(
                text=text,
                input_ids=encode_prompt(tokenizer, text, chat=use_chat),
                reference_answer=gsm8k_reference(answer) if answer is not None else None,
            )
        )
    if not prompts:
        raise ValueError(f'{path} holds no prompt; add lines like {{"question": "..."}}')
    return prompts
