"""Training corpora for ``distill``: files on disk, examples, a token stream.

- ``load_corpus(path, tokenizer)`` reads a JSON-lines file whose rows are ``{"text": ...}``,
  ``{"messages": [...]}`` (rendered with the tokenizer's chat template) or GSM8K-style
  ``{"question": ..., "answer": ...}`` (a user/assistant chat when the tokenizer has a template),
  or a plain ``.txt`` file (one document); ``load_examples`` keeps which tokens are context
  (the prompts of a corpus the teacher wrote, ``mtp_torch.training.corpus.write_corpus``);
- ``TokenStream`` concatenates sequences into one stream and cuts it into training windows, with
  a position that a checkpoint can save and restore.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import numpy.typing as npt

from mtp_torch.jsonl import float_tuple, int_tuple
from mtp_torch.jsonl import read_jsonl as read_jsonl
from mtp_torch.text import read_utf8
from mtp_torch.training.sources import tokenize_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Example",
    "TokenStream",
    "encode_row",
    "has_chat_template",
    "load_corpus",
    "load_examples",
    "read_jsonl",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` has a chat template to render messages with."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_row(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of one corpus row.

    Args:
      row: ``{"text": str}``, ``{"messages": [{"role", "content"}, ...]}`` or
        ``{"question": str, "answer": str}``.
      tokenizer: the model's tokenizer.

    Returns:
      The token ids: plain text gets the tokenizer's special tokens and a final EOS; chats are
      rendered with the chat template; question/answer pairs become a user/assistant chat when
      the tokenizer has a template, else ``"Question: ...\\nAnswer: ..."`` text.

    Raises:
      ValueError: if the row has none of these shapes, or a chat row has no template to render it.
    """
    return next(tokenize_rows([row], tokenizer, batch_size=1))


def load_corpus(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    limit: int | None = None,
) -> list[list[int]]:
    """Read and tokenize a training corpus file (the token ids of ``load_examples``' rows).

    Args:
      path: a ``.jsonl`` file (rows as in ``encode_row``, or written by ``write_corpus``) or any
        other file read as one plain-text document.
      tokenizer: the model's tokenizer.
      limit: read at most this many rows (``None``: all).

    Returns:
      One list of token ids per row (rows that tokenize to nothing are dropped).

    Raises:
      ValueError: if the file is missing, a row is malformed (the message names its line), or
        the corpus holds no tokens.
    """
    return [list(example.ids) for example in load_examples(path, tokenizer, limit=limit)]


def _token_ids(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise ValueError(f"{what} must be a list of non-negative integer token ids")
    return tuple(value)


def _float_tuple(values: Iterable[float] | None) -> tuple[float, ...] | None:
    return None if values is None else float_tuple(values)


@attrs.frozen
class Example:
    """One training sequence whose first ``context_len`` tokens are context, never targets.

    A row the teacher wrote is its prompt (context: the student is not taught to predict the
    user's words) followed by the teacher's greedy response (the targets).

    Attributes:
      ids: token ids.
      context_len: leading tokens that are seen but not supervised, ``0 <= context_len <= len``.
      confidence: the teacher's top-1 probability when it wrote each supervised token
        (``len(ids) - context_len`` values), or ``None`` when unknown.
    """

    ids: tuple[int, ...] = attrs.field(converter=int_tuple)
    context_len: int = attrs.field(default=0)
    confidence: tuple[float, ...] | None = attrs.field(default=None, converter=_float_tuple)

    @confidence.validator
    def _check_confidence(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and len(value) != len(self.ids) - self.context_len:
            raise ValueError(
                f"confidence must hold one value per supervised token ({len(self.ids)} ids - "
                f"{self.context_len} context = {len(self.ids) - self.context_len}), got "
                f"{len(value)}"
            )

    @context_len.validator
    def _check_context_len(self, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= len(self.ids):
            raise ValueError(
                f"context_len must be an integer in [0, {len(self.ids)}] (the sequence length), "
                f"got {value!r}"
            )


def load_examples(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    limit: int | None = None,
) -> list[Example]:
    """Read a corpus file as ``Example`` rows, keeping which tokens are context.

    Rows the teacher wrote (``write_corpus``) carry their exact token ids (``"ids"``) and the
    prompt's length (``"prompt_len"``): their response alone is supervised.  Every other row is
    tokenized as in ``load_corpus`` and supervised whole.

    Args:
      path: a ``.jsonl`` or plain-text file, as for ``load_corpus``.
      tokenizer: the model's tokenizer.
      limit: read at most this many rows.

    Returns:
      One ``Example`` per non-empty row.

    Raises:
      ValueError: as ``load_corpus``; also for ``"ids"`` that are not token ids or a
        ``"prompt_len"`` outside the row, or ids beyond the tokenizer's vocabulary.
    """
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"corpus file {source} does not exist; pass a .jsonl or .txt file")
    if source.suffix not in (".jsonl", ".json"):
        text = read_utf8(source)
        if not text.strip():
            raise ValueError(f"corpus {source} is empty: it holds no text to train on")
        return [Example(encode_row({"text": text}, tokenizer))]
    examples: list[Example] = []
    vocab = len(tokenizer)
    for number, row in read_jsonl(source):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if "ids" in row:
                ids = _token_ids(row["ids"], '"ids"')
                if ids and max(ids) >= vocab:
                    raise ValueError(
                        f'"ids" hold token id {max(ids)} but the tokenizer has {vocab} tokens; '
                        "the row was written for another model"
                    )
                confidence = row.get("confidence")
                example = Example(
                    ids,
                    int(row.get("prompt_len", 0)),
                    None if confidence is None else [float(c) for c in confidence],
                )
            else:
                example = Example(encode_row(row, tokenizer))
        except ValueError as error:
            raise ValueError(f"{source}:{number}: {error}") from error
        if example.ids:
            examples.append(example)
    if not examples:
        raise ValueError(f"corpus {source} is empty: it holds no text to train on")
    return examples


_SAME_DATA = (
    "resume with the same corpus (the same --data file or dataset, seed prompts, --num-examples "
    "and seed), or start a new run in a new --out / out_dir (or delete the old checkpoints)"
)


@attrs.define
class TokenStream:
    """Sequences concatenated into one token stream, cut into consecutive training windows.

    Windows are read one after the other from a cursor; when the stream cannot supply the next
    window the cursor wraps to the start and ``epoch`` grows.  With ``row_aligned`` windows
    (``take_weighted``) each window instead starts at the next sequence's first token.  The sequence order is shuffled
    once with ``seed``.  ``state_dict`` / ``load_state_dict`` save and restore the position.

    Attributes:
      tokens: the concatenated token ids, shape ``(num_tokens,)``.
      cursor: index of the next window's first token (row-aligned windows: of the next row).
      epoch: how many times the stream wrapped.
      supervised: per token, whether it is a training target (``None``: all are).
      starts: where each sequence starts in ``tokens``.
      confidence: per token, the teacher's top-1 probability when it wrote it (1 where unknown);
        ``None`` when no sequence carries any.
    """

    tokens: IntArray
    cursor: int = 0
    epoch: int = 0
    supervised: npt.NDArray[np.bool_] | None = None
    starts: IntArray | None = None
    confidence: FloatArray | None = None

    @classmethod
    def from_sequences(
        cls, sequences: Iterable[Sequence[int] | Example], *, seed: int = 0
    ) -> TokenStream:
        """Build a stream from token-id sequences.

        Args:
          sequences: token-id lists (empty ones are skipped), or ``Example`` rows whose context
            tokens are marked unsupervised (``take_weighted`` gives them weight 0).
          seed: shuffles the sequence order.

        Returns:
          The stream, cursor at 0.

        Raises:
          ValueError: if there is no token at all, or a sequence holds non-integer or negative ids.
        """
        arrays: list[IntArray] = []
        flags: list[npt.NDArray[np.bool_]] = []
        confidences: list[FloatArray] = []
        any_context = any_confidence = False
        for index, item in enumerate(sequences):
            if isinstance(item, (int, np.integer, str, bytes)):
                raise TypeError(
                    f"sequences must be a list of token-id lists (one per document), but item "
                    f"{index} is {item!r}; wrap a single document as [ids]"
                )
            sequence: Sequence[int] = item.ids if isinstance(item, Example) else item
            context_len = item.context_len if isinstance(item, Example) else 0
            array = np.asarray(list(sequence))
            if array.size == 0:
                continue
            if (
                array.ndim != 1
                or not np.issubdtype(array.dtype, np.integer)
                or int(array.min()) < 0
            ):
                raise ValueError(
                    f"sequence {index} must be a flat list of non-negative integer token ids; "
                    "tokenize text first (see mtp_torch load_corpus)"
                )
            arrays.append(array.astype(np.int64))
            flag = np.ones(array.shape[0], dtype=np.bool_)
            flag[:context_len] = False
            confidence = np.ones(array.shape[0], dtype=np.float32)
            if isinstance(item, Example) and item.confidence is not None:
                confidence[context_len:] = item.confidence
                any_confidence = True
            confidences.append(confidence)
            any_context = any_context or context_len > 0
            flags.append(flag)
        if not arrays:
            raise ValueError(
                "the training corpus is empty: pass at least one non-empty sequence of token ids"
            )
        order = np.random.default_rng(seed).permutation(len(arrays))
        supervised = np.concatenate([flags[i] for i in order]) if any_context else None
        lengths = np.array([arrays[i].shape[0] for i in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(
            tokens=np.concatenate([arrays[i] for i in order]),
            supervised=supervised,
            starts=starts,
            confidence=np.concatenate([confidences[i] for i in order]) if any_confidence else None,
        )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, num_windows: int, window_len: int) -> IntArray:
        """The next ``num_windows`` windows of ``window_len`` consecutive tokens.

        Args:
          num_windows: windows wanted, ``>= 1``.
          window_len: tokens per window, at most ``len(self)``.

        Returns:
          Token ids, shape ``(num_windows, window_len)``.

        Raises:
          ValueError: if the stream is shorter than one window.
        """
        return self.take_weighted(num_windows, window_len)[0]

    def take_weighted(
        self, num_windows: int, window_len: int, *, row_aligned: bool = False
    ) -> tuple[IntArray, FloatArray, FloatArray]:
        """The next windows (as ``take``) and each token's weight as a training target.

        Args:
          num_windows: windows wanted, ``>= 1``.
          window_len: tokens per window, at most ``len(self)``.
          row_aligned: start each window at the next sequence's first token, so that its
            tokens see the whole context they were written with (a teacher's greedy text is
            then the teacher's argmax at every position); the tokens of later sequences that
            fill the window are context only (weight 0), and a sequence longer than the window
            is cut.

        Returns:
          ``(windows, weights, confidence)``, each of shape ``(num_windows, window_len)``; a
          weight is 0 for a context token (a prompt) and 1 for a supervised one; confidence is
          the teacher's top-1 probability when it wrote the token (1 where unknown).

        Raises:
          ValueError: if the stream is shorter than one window.
        """
        if window_len > len(self):
            raise ValueError(
                f"the corpus holds {len(self)} tokens but one training window needs {window_len}; "
                "pass more (or longer) sequences or a smaller seq_len"
            )
        windows = np.empty((num_windows, window_len), dtype=np.int64)
        weights = np.ones((num_windows, window_len), dtype=np.float32)
        confidence = np.ones((num_windows, window_len), dtype=np.float32)
        if row_aligned:
            self._fill_row_aligned(windows, weights, confidence)
            return windows, weights, confidence
        for row in range(num_windows):
            if self.cursor + window_len > len(self):
                self.cursor = 0
                self.epoch += 1
            cut = slice(self.cursor, self.cursor + window_len)
            windows[row] = self.tokens[cut]
            if self.supervised is not None:
                weights[row] = self.supervised[cut]
            if self.confidence is not None:
                confidence[row] = self.confidence[cut]
            self.cursor += window_len
        return windows, weights, confidence

    def _fill_row_aligned(
        self, windows: IntArray, weights: FloatArray, confidence: FloatArray
    ) -> None:
        starts = self.starts if self.starts is not None else np.zeros(1, dtype=np.int64)
        total, window_len = len(self), windows.shape[1]
        for row in range(windows.shape[0]):
            if self.cursor >= starts.shape[0]:
                self.cursor = 0
                self.epoch += 1
            start = int(starts[self.cursor])
            end = int(starts[self.cursor + 1]) if self.cursor + 1 < starts.shape[0] else total
            index = (start + np.arange(window_len)) % total
            windows[row] = self.tokens[index]
            own = np.arange(window_len) < end - start
            flags = self.supervised[index] if self.supervised is not None else True
            weights[row] = np.where(own & flags, 1.0, 0.0)
            if self.confidence is not None:
                confidence[row] = self.confidence[index]
            self.cursor += 1

    def fingerprint(self) -> str:
        """What identifies the data: sha256 over the token ids, targets and sequence starts."""
        hasher = hashlib.sha256(np.ascontiguousarray(self.tokens, dtype=np.int64).tobytes())
        for extra in (self.supervised, self.starts, self.confidence):
            hasher.update(b"|" if extra is None else np.ascontiguousarray(extra).tobytes())
        return hasher.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """The position and the data's identity, as JSON values.

        ``{"cursor", "epoch", "num_tokens", "fingerprint"}`` (``fingerprint()``: a resume on
        other data is refused).
        """
        return {
            "cursor": int(self.cursor),
            "epoch": int(self.epoch),
            "num_tokens": len(self),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by ``state_dict``.

        Args:
          state: the saved position.

        Raises:
          ValueError: if it was saved for another corpus (another length or fingerprint; a
            state without a fingerprint, from an older version, is checked by length only).
        """
        if int(state["num_tokens"]) != len(self):
            raise ValueError(
                f"cannot resume: the checkpoint was written for a corpus of "
                f"{state['num_tokens']} tokens, this one has {len(self)}; {_SAME_DATA}"
            )
        recorded = state.get("fingerprint")
        if isinstance(recorded, str) and recorded != self.fingerprint():
            raise ValueError(
                f"cannot resume: the checkpoint was trained on other data of the same length "
                f"({len(self)} tokens; data sha256 {recorded[:12]}..., this corpus gives "
                f"{self.fingerprint()[:12]}...); {_SAME_DATA}"
            )
        self.cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])
