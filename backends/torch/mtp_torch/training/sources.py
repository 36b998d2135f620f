"""Training data from the Hugging Face Hub (or any ``datasets`` dataset), tokenised in batches.

``mtp convert --data`` takes a local file (``training.data.load_examples``) or a dataset id;
this module serves the second: ``datasets.load_dataset(id, config, split=...)``, a field mapping
from the dataset's column names to the corpus row shapes of ``training.data.encode_row``
(``text``; ``messages``; ``question`` + ``answer``), and batched tokenisation. The paper converts
with MetaMathQA (Kirchenbauer et al., arXiv 2602.06019, section on training data), whose columns
are ``query`` and ``response``: ``fields={"question": "query", "answer": "response"}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from mtp_torch.text import render_chat_template

__all__ = ["RowText", "load_dataset_examples", "parse_field_mapping", "row_text"]

# Corpus row fields a dataset column can be mapped to.
ROW_FIELDS = ("text", "messages", "question", "answer")

RowText = tuple[str, bool]
"""A row rendered for the tokenizer: the text, and whether the tokenizer adds special tokens and
an EOS is appended (plain text) or the chat template already placed them (chats)."""


def parse_field_mapping(spec: str | None) -> dict[str, str]:
    """Parse ``question=query,answer=response`` into ``{"question": "query", ...}``.

    Args:
      spec: comma-separated ``ROW_FIELD=COLUMN`` pairs; ``None`` or empty: no renaming.

    Returns:
      The mapping from corpus row field to dataset column.

    Raises:
      ValueError: for a pair without ``=`` or a row field other than ``ROW_FIELDS``.

    Example:
      >>> parse_field_mapping("question=query, answer=response")
      {'question': 'query', 'answer': 'response'}
    """
    mapping: dict[str, str] = {}
    for pair in (spec or "").split(","):
        if not pair.strip():
            continue
        field, sep, column = (part.strip() for part in pair.partition("="))
        if not sep or not field or not column:
            raise ValueError(
                f"bad field mapping {pair!r}; use ROW_FIELD=COLUMN, e.g. question=query"
            )
        if field not in ROW_FIELDS:
            raise ValueError(f"unknown row field {field!r} in the mapping; use one of {ROW_FIELDS}")
        mapping[field] = column
    return mapping


def row_text(row: Mapping[str, Any], tokenizer: Any) -> RowText:
    """One corpus row as the text the tokenizer sees (the rules of ``encode_row``).

    Chats (``messages``, or ``question`` + ``answer`` with a chat template) are rendered with the
    chat template; plain text and question/answer pairs without a template become text to which
    the tokenizer adds its special tokens and an EOS is appended.

    Raises:
      ValueError: if the row has none of the shapes, or a chat needs a missing template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError('"messages" must be a list of {"role": ..., "content": ...} objects')
        if not has_template:
            raise ValueError(
                'a "messages" row needs a tokenizer with a chat template; use {"text": ...} rows '
                "for a model without one"
            )
        chat = [dict(m) for m in messages]
        return render_chat_template(tokenizer, chat), False
    if "question" in row and "answer" in row:
        question, answer = str(row["question"]), str(row["answer"])
        if has_template:
            chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            return render_chat_template(tokenizer, chat), False
        return f"Question: {question}\nAnswer: {answer}", True
    if "text" in row:
        return str(row["text"]), True
    raise ValueError(
        f'a corpus row needs a "text", a "messages" or "question"+"answer" field, got keys '
        f"{sorted(row)}"
    )


def tokenize_rows(
    rows: Iterable[Mapping[str, Any]], tokenizer: Any, batch_size: int = 256
) -> Iterator[list[int]]:
    """Token ids of corpus rows, tokenised ``batch_size`` rows per tokenizer call.

    Plain-text rows get the tokenizer's special tokens and a final EOS (unless already there);
    chat rows are tokenised as rendered. Rows that tokenise to nothing yield an empty list.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[RowText] = []
    for row in rows:
        batch.append(row_text(row, tokenizer))
        if len(batch) == batch_size:
            yield from _tokenize_batch(batch, tokenizer)
            batch = []
    if batch:
        yield from _tokenize_batch(batch, tokenizer)


def _tokenize_batch(batch: Sequence[RowText], tokenizer: Any) -> Iterator[list[int]]:
    # One call per kind (special tokens added or not), results put back in row order.
    out: list[list[int]] = [[] for _ in batch]
    eos = getattr(tokenizer, "eos_token_id", None)
    for plain in (True, False):
        where = [i for i, (_, is_plain) in enumerate(batch) if is_plain is plain]
        if not where:
            continue
        encoded = tokenizer([batch[i][0] for i in where], add_special_tokens=plain)["input_ids"]
        for i, ids in zip(where, encoded, strict=True):
            ids = [int(t) for t in ids]
            if plain and eos is not None and (not ids or ids[-1] != int(eos)):
                ids.append(int(eos))
            out[i] = ids
    yield from out


def load_dataset_examples(
    dataset_id: str,
    tokenizer: Any,
    *,
    split: str = "train",
    config_name: str | None = None,
    fields: Mapping[str, str] | None = None,
    limit: int | None = None,
    batch_size: int = 256,
) -> list[list[int]]:
    """Token ids of the rows of a ``datasets`` dataset (a Hub id or a local dataset directory).

    Args:
      dataset_id: what ``datasets.load_dataset`` takes: a Hub id such as
        ``meta-math/MetaMathQA`` or a local directory of data files.
      tokenizer: the model's tokenizer.
      split: the split to read (``--data-split``).
      config_name: the dataset's configuration (e.g. ``main`` for ``openai/gsm8k``).
      fields: corpus row field -> dataset column (``--data-fields``); unmapped row fields are
        read from columns of the same name.
      limit: read at most this many rows.
      batch_size: rows per tokenizer call.

    Returns:
      One list of token ids per non-empty row.

    Raises:
      ImportError: if ``datasets`` is not installed (the message says how to install it).
      ValueError: if a mapped column is missing or the dataset holds no tokens.
    """
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - the test environment has datasets
        raise ImportError(
            "reading --data from the Hugging Face Hub needs the `datasets` package: "
            'pip install "mtp-lm[hub]"'
        ) from error
    dataset = datasets.load_dataset(dataset_id, config_name, split=split)
    if limit is not None:
        dataset = dataset.select(range(min(int(limit), len(dataset))))
    mapping = dict(fields or {})
    missing = sorted(set(mapping.values()) - set(dataset.column_names))
    if missing:
        raise ValueError(
            f"dataset {dataset_id} has no column(s) {missing}; its columns are "
            f"{dataset.column_names} (fix --data-fields)"
        )
    renamed = ({**row, **{f: row[c] for f, c in mapping.items()}} for row in dataset)
    sequences = [ids for ids in tokenize_rows(renamed, tokenizer, batch_size) if ids]
    if not sequences:
        raise ValueError(f"dataset {dataset_id} ({split}) holds no text to train on")
    return sequences
