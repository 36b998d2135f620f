"""Replaying decoding policies from one recorded pass per token.

Every pass the engine runs reads two kinds of outputs: at a real token (pending or draft), the
model's next token after that token's prefix; at the ``j``-th mask after a real token, the
model's proposal for the token ``j`` further on.  Both depend only on the real prefix the row
holds (masks are cropped after every step).  So along one greedy text, the passes
``[x_p, <mask> x (k - 1)]`` on the cache of ``x_<p``, one per position ``p``, hold every output
any policy of width ``<= k`` reads while its text stays on that greedy text.

``record_proposals`` runs those passes through any backend; ``replay`` then runs the engine
itself (``mtp_core.decode``) against a backend that answers from the recording.  The policies'
rules, drafts, budgets and stops are the engine's own, so a replay gives the tokens, passes,
acceptance histogram and pass widths that decoding gives, for every policy, at the cost of one
recording.  Lossless verification never leaves the greedy text, so its replay is what decoding
does (to the backend's rounding between pass widths).  A policy that emits an unverified
proposal other than the greedy token (``ConfAdapt``, ``StaticK`` without ``verify``) leaves it;
from there the replay answers as if the text had stayed on the greedy path and counts those
tokens (``ReplayResult.off_reference``): its figures are then an estimate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from mtp_core._src.backend import GREEDY, Backend, Sampling, StepInputs, StepOutputs
from mtp_core._src.engine import DecodeResult, decode, plan_step
from mtp_core._src.policies import AcceptancePolicy

__all__ = ["ProposalTable", "ReplayResult", "record_proposals", "replay"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def _int_array(value: Any) -> IntArray:
    return np.asarray(value, dtype=np.int64)


def _float_array(value: Any) -> FloatArray:
    return np.asarray(value, dtype=np.float64)


def _int_tuple(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(t) for t in ids)


@attrs.frozen(eq=False)
class ProposalTable:
    """One prompt's greedy text and, at each of its positions, what a pass of ``k`` reads.

    Row ``i`` is the pass ``[x, <mask> x (k - 1)]`` whose real token ``x`` is the one before
    generated token ``i`` (the prompt's last token for ``i = 0``): column 0 is the model's next
    token there (generated token ``i`` itself), column ``j >= 1`` the ``j``-th mask's proposal
    for generated token ``i + j``.

    Attributes:
      prompt: the prompt's token ids.
      reference: the greedy tokens generated, ``(n,)``.
      tokens: ``(n, k)`` tokens read at each pass.
      confidences: ``(n, k)`` their top-1 probabilities.
      mask_token_id: the mask id the passes fed.
      max_new_tokens: the budget the text was generated with.
      stop_token_ids: the stop tokens it was generated with.
    """

    prompt: IntArray = attrs.field(converter=_int_array)
    reference: IntArray = attrs.field(converter=_int_array)
    tokens: IntArray = attrs.field(converter=_int_array)
    confidences: FloatArray = attrs.field(converter=_float_array)
    mask_token_id: int = attrs.field(converter=int)
    max_new_tokens: int = attrs.field(converter=int)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)

    def __attrs_post_init__(self) -> None:
        n = self.reference.shape[0]
        if self.prompt.ndim != 1 or self.prompt.shape[0] == 0:
            raise ValueError("prompt must be a non-empty 1-D sequence of token ids")
        if self.reference.ndim != 1:
            raise ValueError("reference must be a 1-D sequence of token ids")
        if self.tokens.ndim != 2 or self.tokens.shape[0] != n or self.tokens.shape[1] < 1:
            raise ValueError(
                f"tokens must have shape (len(reference), k) = ({n}, k >= 1), got "
                f"{self.tokens.shape}"
            )
        if self.confidences.shape != self.tokens.shape:
            raise ValueError(
                f"confidences must have the shape of tokens {self.tokens.shape}, got "
                f"{self.confidences.shape}"
            )
        if not np.array_equal(self.tokens[:, 0], self.reference):
            raise ValueError(
                "column 0 of tokens must be the reference (the greedy text the table records)"
            )
        if n > self.max_new_tokens:
            raise ValueError(
                f"the reference holds {n} tokens, more than max_new_tokens={self.max_new_tokens}"
            )

    @property
    def k(self) -> int:
        """Positions per recorded pass: policies of width up to ``k`` can be replayed."""
        return int(self.tokens.shape[1])


@attrs.frozen(eq=False)
class ReplayResult:
    """What decoding one ``ProposalTable``'s prompt with a policy gives, replayed.

    Attributes:
      decode: the engine's result (tokens, passes, acceptance histogram, stop reason).
      widths: ``(passes,)`` the number of tokens each pass fed (the prompt's pass included).
      off_reference: generated tokens that differ from the greedy reference at their index
        (0 for lossless verification).  Nonzero means the text left the greedy path and the
        outputs after that point were answered as if it had not: an estimate.
      unrecorded: reads no recorded output answers, answered with the mask token at
        confidence 0 (a draft that is the mask token itself, which the model reads as a mask:
        only models that propose their own mask token, such as untrained ones, do this).
    """

    decode: DecodeResult
    widths: IntArray
    off_reference: int
    unrecorded: int = 0

    @property
    def exact(self) -> bool:
        """Whether every output the policy read was recorded: the text stayed on the greedy
        reference and no read fell outside the table."""
        return self.off_reference == 0 and self.unrecorded == 0

    @property
    def new_tokens(self) -> int:
        """Tokens generated."""
        return int(self.decode.tokens[0].shape[0])

    @property
    def passes(self) -> int:
        """Forward passes, the prompt's included."""
        return int(self.decode.num_forward_passes)


@attrs.define
class _ReplayCache:
    length: int = 0


class _ReplayBackend:
    """A ``Backend`` of one row that answers every read from a ``ProposalTable``."""

    def __init__(self, table: ProposalTable) -> None:
        self.table = table
        self.widths: list[int] = []
        self.unrecorded = 0
        self.ended_by_stop = bool(
            table.reference.shape[0] > 0 and int(table.reference[-1]) in table.stop_token_ids
        )

    def new_cache(self, batch_size: int) -> _ReplayCache:
        if batch_size > 1:  # 0 for a zero budget: the engine then runs no pass
            raise ValueError("a replay decodes one prompt at a time")
        return _ReplayCache()

    def cache_length(self, cache: _ReplayCache) -> int:
        return cache.length

    def forward(
        self, cache: _ReplayCache, inputs: StepInputs, sampling: Sampling, seed: int
    ) -> tuple[StepOutputs, _ReplayCache]:
        table, past = self.table, cache.length
        ids = [int(t) for t in inputs.token_ids[0]]
        positions = [int(p) for p in inputs.position_ids[0]]
        if positions != list(range(past, past + len(ids))) or not bool(
            np.all(inputs.attention_mask)
        ):
            raise AssertionError("a one-row replay expects contiguous positions and no holes")
        self.widths.append(len(ids))
        reads = [int(r) for r in inputs.read_index[0]]
        tokens = np.zeros((1, len(reads)), dtype=np.int64)
        confidences = np.zeros((1, len(reads)), dtype=np.float64)
        offset = table.prompt.shape[0] - 1  # row i of the table is the pass at position offset + i
        for column, read in enumerate(reads):
            anchor = read
            while anchor >= 0 and ids[anchor] == table.mask_token_id:
                anchor -= 1
            anchor_position = past + anchor  # a mask's real token (the block's last one before it)
            j = positions[read] - anchor_position
            row = anchor_position - offset
            if j >= table.k:
                # A draft that is the mask token itself extends the run of masks (the model
                # reads it as one) past what the table holds: no recorded output answers it.
                self.unrecorded += 1
                tokens[0, column], confidences[0, column] = table.mask_token_id, 0.0
                continue
            if row >= table.tokens.shape[0] and self.ended_by_stop:
                # Off the greedy path past the text's stop token: the estimate ends there too.
                tokens[0, column], confidences[0, column] = int(table.reference[-1]), 1.0
                continue
            if not 0 <= row < table.tokens.shape[0]:
                raise ValueError(
                    f"the replay asked for position {anchor_position}, outside the recorded "
                    f"text (prompt {offset + 1} tokens, {table.tokens.shape[0]} generated); "
                    "replay with the recording's max_new_tokens and stop tokens"
                )
            tokens[0, column] = table.tokens[row, j]
            confidences[0, column] = table.confidences[row, j]
        cache.length += len(ids)
        return StepOutputs(tokens=tokens, confidences=confidences), cache

    def crop(self, cache: _ReplayCache, length: int) -> _ReplayCache:
        cache.length = min(cache.length, int(length))
        return cache

    def reindex(self, cache: _ReplayCache, rows: IntArray, slots: IntArray | None) -> _ReplayCache:
        if slots is not None:
            cache.length = int(slots.shape[1])
        return cache


def record_proposals(
    backend: Backend[Any],
    prompt: Sequence[int],
    *,
    mask_token_id: int,
    k: int,
    max_new_tokens: int,
    stop_token_ids: Iterable[int] = (),
) -> ProposalTable:
    """Greedy-decode ``prompt`` one token a pass, each pass also feeding ``k - 1`` masks.

    Costs one pass per generated token, like one-token decoding (the prompt's tokens before its
    last go in one pass first).

    Args:
      backend: any ``mtp_core.Backend``; one row is decoded.
      prompt: the prompt's token ids.
      mask_token_id: the model's mask token id.
      k: positions per pass (the widest policy to replay: ``StaticK(k)``, ``ConfAdapt(t, k)``).
      max_new_tokens: tokens to generate at most.
      stop_token_ids: generation ends after emitting one of these (kept).

    Returns:
      The ``ProposalTable``; replay policies on it with ``replay``.

    Raises:
      ValueError: for an empty prompt, ``k < 1`` or a negative budget.
    """
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1 (positions per pass), got {k}")
    if int(max_new_tokens) < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stops = frozenset(int(t) for t in stop_token_ids)
    cache = backend.new_cache(1)

    def run(block: list[int], past: int, read_start: int) -> tuple[StepOutputs, Any]:
        visible = np.ones((1, past), dtype=np.bool_)
        inputs = plan_step([block], [read_start], [len(block) - read_start], [past], visible, 0)
        return backend.forward(cache, inputs, GREEDY, 0)

    if len(ids) > 1:  # the prompt before its last token, reading only its last position
        _, cache = run(ids[:-1], 0, len(ids) - 2)
    last, past = ids[-1], len(ids) - 1
    reference: list[int] = []
    tokens: list[IntArray] = []
    confidences: list[FloatArray] = []
    while len(reference) < int(max_new_tokens):
        outputs, cache = run([last] + [int(mask_token_id)] * (int(k) - 1), past, 0)
        cache = backend.crop(cache, past + 1)
        tokens.append(np.asarray(outputs.tokens[0], dtype=np.int64))
        confidences.append(np.asarray(outputs.confidences[0], dtype=np.float64))
        last, past = int(outputs.tokens[0, 0]), past + 1
        reference.append(last)
        if last in stops:
            break
    shape = (0, int(k))
    return ProposalTable(
        prompt=ids,
        reference=reference,
        tokens=np.stack(tokens) if tokens else np.zeros(shape, dtype=np.int64),
        confidences=np.stack(confidences) if confidences else np.zeros(shape),
        mask_token_id=mask_token_id,
        max_new_tokens=max_new_tokens,
        stop_token_ids=sorted(stops),
    )


def replay(table: ProposalTable, policy: AcceptancePolicy, *, verify: bool = False) -> ReplayResult:
    """Decode the table's prompt with ``policy`` against the recorded outputs.

    The engine (``mtp_core.decode``) runs as it would against the model, with the recording's
    budget and stop tokens; only the outputs come from the table.

    Args:
      table: a ``record_proposals`` recording.
      policy: any policy of at most ``table.k`` positions.
      verify: lossless mode, as in ``decode``.

    Returns:
      The ``ReplayResult``.

    Raises:
      ValueError: if the policy reads more positions than the table recorded.
    """
    if int(policy.num_positions) > table.k:
        raise ValueError(
            f"the policy reads {policy.num_positions} positions a pass; the table was recorded "
            f"with k={table.k}: record with a larger k"
        )
    backend = _ReplayBackend(table)
    result = decode(
        backend,
        [table.prompt.tolist()],
        policy,
        mask_token_id=table.mask_token_id,
        max_new_tokens=table.max_new_tokens,
        stop_token_ids=table.stop_token_ids,
        verify=verify,
    )
    generated = result.tokens[0]
    common = min(generated.shape[0], table.reference.shape[0])
    off = int(np.count_nonzero(generated[:common] != table.reference[:common]))
    off += abs(generated.shape[0] - table.reference.shape[0])
    return ReplayResult(
        decode=result,
        widths=np.asarray(backend.widths, dtype=np.int64),
        off_reference=off,
        unrecorded=backend.unrecorded,
    )
