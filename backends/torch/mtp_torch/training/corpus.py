"""A corpus the teacher writes itself, and the prompts it answers.

``write_corpus(model, tokenizer, path, n)`` lets the teacher write its own corpus: prompts are
seed prompts from a file (``read_seed_prompts``, e.g. GSM8K train questions) or sampled
Magpie-style from the chat template's user prefix (``user_prefix``), responses are the teacher's
own (greedy by default) continuations; rows are deduplicated and cached as JSON lines, so a
second call reuses them.  ``load_examples`` (``mtp_torch.training.data``) reads the cache back.

Self-written data follows the paper's observation that the student only needs the teacher's own
distribution (Kirchenbauer et al., arXiv 2602.06019; docs/method.md section 6,
what this project adds to the paper).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import attrs
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from mtp_torch.jsonl import read_jsonl
from mtp_torch.text import chat_prompt, render_chat_template
from mtp_torch.training.data import has_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["GENERATE_BATCH_SIZE", "read_seed_prompts", "user_prefix", "write_corpus"]

#: Prompts answered per ``generate`` call unless told otherwise (``write_corpus``, ``mtp convert``).
GENERATE_BATCH_SIZE = 16
_SENTINEL = "\x00MTP_USER_CONTENT\x00"
# write_corpus stops after this many generation rounds in a row that added no new row.
_MAX_STALLS = 8

# A response as exact token ids: (prompt ids, response ids, top-1 probability per response id).
IdPair = tuple[list[int], list[int], list[float]]


def read_seed_prompts(
    path: str | os.PathLike[str], *, field: str = "question", limit: int | None = None
) -> list[str]:
    """Read prompts (e.g. GSM8K train questions) from a JSON-lines file.

    Args:
      path: the file; each row holds the prompt under ``field`` (rows with a ``"messages"``
        list contribute their first user message instead).
      field: the key of the prompt text.
      limit: keep at most this many prompts.

    Returns:
      The distinct, non-empty prompts in file order.

    Raises:
      ValueError: if the file holds no prompt.
    """
    prompts: list[str] = []
    seen: set[str] = set()
    for _, row in read_jsonl(path):
        text: Any = row.get(field)
        if text is None and isinstance(row.get("messages"), list):
            text = next(
                (m.get("content") for m in row["messages"] if m.get("role") == "user"), None
            )
        if not isinstance(text, str) or not text.strip() or text.strip() in seen:
            continue
        seen.add(text.strip())
        prompts.append(text.strip())
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path} holds no prompt under {field!r}; pass another file or field")
    return prompts


def user_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The chat template's text up to where a user's message starts (the Magpie prompt).

    Args:
      tokenizer: a tokenizer with a chat template.

    Returns:
      The rendered text before the user content (system prompt and user header included).

    Raises:
      ValueError: if the tokenizer has no chat template.
    """
    if not has_chat_template(tokenizer):
        raise ValueError(
            "Magpie-style prompts need a chat template; pass seed prompts (a file) or a corpus "
            "with --data for a model without one"
        )
    rendered = render_chat_template(
        tokenizer, [{"role": "user", "content": _SENTINEL}], add_generation_prompt=False
    )
    prefix = str(rendered).split(_SENTINEL)[0]
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prefix.startswith(bos):
        prefix = prefix[len(bos) :]
    return prefix


def _left_padded(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> Any:
    """Text prompts tokenized as one left-padded batch (the tokenizer left as it was).

    A tokenizer without a pad token (some GGUF loads give none) pads with its EOS: the attention
    mask hides the padding, so which id fills it does not matter.
    """
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if old_pad is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an EOS token to pad a batch of prompts "
                "with; set tokenizer.pad_token (e.g. to an unused special token)"
            )
        tokenizer.pad_token = tokenizer.eos_token
    try:
        return tokenizer(list(prompts), add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None


def _generate_texts(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
) -> list[str]:
    """Batched ``model.generate`` on left-padded text prompts; decoded continuations."""
    batch = _left_padded(tokenizer, prompts)
    device = next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    kwargs: dict[str, Any] = {"do_sample": temperature > 0.0}
    if temperature > 0.0:
        kwargs.update(temperature=float(temperature), top_p=1.0, top_k=0)
    with torch.no_grad():
        output = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=int(max_new_tokens),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            **kwargs,
        )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [str(t).strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class _TopProbabilities:
    """A logits processor that records each step's top-1 probability per row (and changes nothing)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(torch.softmax(scores.float(), dim=-1).amax(dim=-1).cpu())
        return scores


def _generate_ids(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
) -> list[IdPair]:
    """Greedy continuations as exact token ids: ``(prompt_ids, response_ids, confidences)``.

    The response keeps the first EOS (where one came) and nothing after it, so the pair is the
    teacher's own argmax chain token for token (re-encoding decoded text can split differently).
    ``confidences[i]`` is the teacher's top-1 probability when it wrote response token ``i``.
    """
    batch = _left_padded(tokenizer, prompts)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    recorder = _TopProbabilities()
    with torch.no_grad():
        output = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=int(max_new_tokens),
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([recorder]),
        )
    width = batch["input_ids"].shape[1]
    confidences = torch.stack(recorder.steps, dim=1) if recorder.steps else None
    rows: list[IdPair] = []
    for row in range(output.shape[0]):
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        response = [int(t) for t in output[row, width:].tolist()]
        if eos is not None and eos in response:
            response = response[: response.index(eos) + 1]
        confidence = [] if confidences is None else confidences[row, : len(response)].tolist()
        rows.append(([int(t) for t in prompt], response, [round(c, 4) for c in confidence]))
    return rows


def _render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    rendered = chat_prompt(tokenizer, prompt)
    return f"Question: {prompt}\nAnswer:" if rendered is None else rendered


def write_corpus(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike[str],
    num_examples: int,
    *,
    seed_prompts: Sequence[str] | None = None,
    max_new_tokens: int = 256,
    prompt_max_new_tokens: int = 64,
    batch_size: int = GENERATE_BATCH_SIZE,
    temperature: float = 0.0,
    prompt_temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Let the teacher write (or extend) a cached chat corpus of ``num_examples`` rows.

    Prompts come from ``seed_prompts`` (in a seeded random order) and, once those run out or
    when none are given, are sampled Magpie-style: the model continues the chat template's user
    prefix and its text up to the end-of-turn token is the prompt.  Each response is the
    model's own continuation of the rendered prompt (greedy when ``temperature == 0``).  Rows
    are deduplicated by prompt and appended to ``path`` batch by batch, so an interrupted call
    keeps its work and a later call only writes what is missing.

    Args:
      model: the teacher (a transformers causal LM), used for generation only.
      tokenizer: its tokenizer; Magpie prompts need a chat template.
      path: the JSON-lines cache; rows are ``{"messages": [user, assistant], "source": ...}``.
      num_examples: rows wanted in the cache, ``>= 1``.
      seed_prompts: prompts to answer first (e.g. GSM8K train questions).
      max_new_tokens: response length cap, in tokens.
      prompt_max_new_tokens: Magpie prompt length cap, in tokens.
      batch_size: prompts generated per ``generate`` call.
      temperature: response sampling temperature; 0 is greedy (the teacher's argmax chain).
      prompt_temperature: Magpie prompt sampling temperature, ``> 0``.
      seed: seeds the prompt order and the sampling.
      progress: show a tqdm bar.

    Returns:
      The first ``num_examples`` rows of the cache.

    Raises:
      ValueError: on a bad count, or when no prompt source is available.
    """
    _check_settings(num_examples, batch_size, prompt_temperature)
    cache = Path(path)
    rows = [row for _, row in read_jsonl(cache) if "messages" in row] if cache.is_file() else []
    if len(rows) >= num_examples:
        return rows[:num_examples]
    if seed_prompts is None and not has_chat_template(tokenizer):
        raise ValueError(
            "the model's tokenizer has no chat template, so prompts cannot be sampled; pass "
            "seed prompts (e.g. a file of questions) or a corpus file"
        )
    seen = {row["messages"][0]["content"] for row in rows}
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(seed_prompts or []))]
    source = _PromptSource(
        pending=[seed_prompts[i] for i in order if seed_prompts and seed_prompts[i] not in seen],
        max_new_tokens=prompt_max_new_tokens,
        temperature=prompt_temperature,
    )
    writer = _Writer(
        num_examples=num_examples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        rows=rows,
        seen=seen,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=num_examples, initial=len(rows), desc="writing corpus", disable=not progress)
    try:
        with _generating(model, seed + len(rows)), open(cache, "a", encoding="utf-8") as handle:
            writer.run(model, tokenizer, source, handle, bar.update)
    finally:
        bar.close()
    if not rows:
        raise ValueError("the teacher wrote no usable row; pass seed prompts or a corpus file")
    return rows[:num_examples]


def _check_settings(num_examples: int, batch_size: int, prompt_temperature: float) -> None:
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompt_temperature > 0.0:
        raise ValueError(
            f"prompt_temperature must be > 0 (Magpie prompts are sampled), got {prompt_temperature}"
        )


@contextmanager
def _generating(model: Any, seed: int) -> Iterator[None]:
    """Eval mode and a seeded torch RNG for generation; both restored afterwards."""
    was_training = model.training
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(generator_state)
        model.train(was_training)


@attrs.define
class _PromptSource:
    """The next prompts: the pending seed prompts in order, then Magpie samples.

    Attributes:
      pending: seed prompts not answered yet.
      max_new_tokens: Magpie prompt length cap, in tokens.
      temperature: Magpie prompt sampling temperature.
    """

    pending: list[str]
    max_new_tokens: int
    temperature: float

    def next(
        self, model: Any, tokenizer: PreTrainedTokenizerBase, want: int, seen: set[str]
    ) -> tuple[list[str], str] | None:
        """Up to ``want`` new prompts and their source (``"seed"`` or ``"magpie"``).

        Returns:
          ``None`` when no prompt can come any more (seeds used up and no chat template); an
          empty list when every sampled prompt was empty or already seen.
        """
        if self.pending:
            prompts, self.pending = self.pending[:want], self.pending[want:]
            return prompts, "seed"
        if not has_chat_template(tokenizer):
            return None
        sampled = _generate_texts(
            model,
            tokenizer,
            [user_prefix(tokenizer)] * want,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
        )
        return list(dict.fromkeys(p for p in sampled if p and p not in seen)), "magpie"


def _respond(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
) -> tuple[list[str], list[IdPair | None]]:
    """The teacher's responses to ``prompts``, and (greedy only) their exact token ids."""
    rendered = [_render_prompt(tokenizer, p) for p in prompts]
    if temperature > 0.0:
        responses = _generate_texts(
            model, tokenizer, rendered, max_new_tokens=max_new_tokens, temperature=temperature
        )
        return responses, [None] * len(responses)
    pairs = _generate_ids(model, tokenizer, rendered, max_new_tokens=max_new_tokens)
    responses = [str(tokenizer.decode(pair[1], skip_special_tokens=True)).strip() for pair in pairs]
    return responses, list(pairs)


def _corpus_row(prompt: str, response: str, source: str, pair: IdPair | None) -> dict[str, Any]:
    """One cache row: the chat, where its prompt came from and (greedy) its exact ids."""
    row: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ],
        "source": source,
    }
    if pair is not None:
        # The exact greedy chain: training targets are the teacher's own argmax tokens, and
        # only the response is supervised (the prompt is context).  The teacher's confidence
        # per response token lets training focus on the runs ConfAdapt can accept.
        row["ids"] = pair[0] + pair[1]
        row["prompt_len"] = len(pair[0])
        row["confidence"] = pair[2]
    return row


@attrs.define
class _Writer:
    """Appends the teacher's rows to the cache until it holds ``num_examples`` (or stalls).

    Attributes:
      num_examples: rows wanted.
      batch_size: prompts per generation round.
      max_new_tokens: response length cap, in tokens.
      temperature: response sampling temperature (0: greedy, with exact ids).
      rows: the rows so far (extended in place).
      seen: their prompts (extended in place).
    """

    num_examples: int
    batch_size: int
    max_new_tokens: int
    temperature: float
    rows: list[dict[str, Any]]
    seen: set[str]

    def run(
        self,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        source: _PromptSource,
        handle: IO[str],
        advance: Callable[[int], object],
    ) -> None:
        """Generation rounds until enough rows, no prompt source, or ``_MAX_STALLS`` idle rounds."""
        stalls = 0
        while len(self.rows) < self.num_examples:
            # 1. The next prompts; an empty Magpie round counts as a stall.
            drawn = source.next(
                model,
                tokenizer,
                min(self.batch_size, self.num_examples - len(self.rows)),
                self.seen,
            )
            if drawn is None:
                break
            prompts, origin = drawn
            if not prompts:
                stalls += 1
                if stalls >= _MAX_STALLS:
                    break
                continue
            # 2. The teacher's responses, appended as new rows (empty and repeated ones dropped).
            before = len(self.rows)
            responses, pairs = _respond(
                model,
                tokenizer,
                prompts,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
            )
            for prompt, response, pair in zip(prompts, responses, pairs, strict=True):
                if not response or prompt in self.seen or len(self.rows) >= self.num_examples:
                    continue
                row = _corpus_row(prompt, response, origin, pair)
                handle.write(json.dumps(row) + "\n")
                self.rows.append(row)
                self.seen.add(prompt)
                advance(1)
            handle.flush()
            # 3. Give up after many rounds in a row that added nothing (empty or repeated text).
            stalls = 0 if len(self.rows) > before else stalls + 1
            if stalls >= _MAX_STALLS:
                break
