"""The backend-agnostic multi-token decode loop.

One step, per row (docs/method.md sections 5-6; paper section on decoding):

1. Feed the *pending* tokens (accepted earlier, keys/values not cached yet), then, in lossless
   mode, the unverified *draft* tokens of the previous step, then ``k - 1`` mask tokens, all at
   contiguous positions.
2. Read the model's top-1 token and probability at the last pending position, at every draft
   position and at every mask position.
3. Without verification the policy decides how many of the ``k`` proposals to keep, and all of
   them are emitted.  With verification the drafts are compared with the greedy tokens the same
   pass produced; the matching prefix plus one corrected token are emitted, and the mask
   proposals become the next drafts only if every draft matched.
4. The mask slots' keys/values are dropped from the cache (masks stood where real tokens go);
   emitted tokens whose keys/values were computed as masks are fed again as pending next step.

Rows advance at their own pace.  The cache keeps one length for the whole batch; a row that
accepted fewer tokens than another owns *holes* (slots it never attends to).  Finished rows leave
the batch, and the cache is compacted when holes pile up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt

from mtp_core._src.backend import GREEDY, Backend, Sampling, StepInputs, StepOutputs
from mtp_core._src.policies import AcceptancePolicy

__all__ = ["DecodeResult", "StopCriterion", "StopReason", "decode", "plan_step"]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

ChunkCallback = Callable[[int, IntArray], None]
# ``criterion(row, generated)``: True ends the row after the last of its ``generated`` tokens.
StopCriterion = Callable[[int, IntArray], bool]
# Why a row ended: it emitted a stop token, ``stop_criterion`` ended it, or it used its budget.
StopReason = Literal["stop_token", "stop_criterion", "max_new_tokens"]

# Compact the cache when some row owns more than this many holes and they are over a quarter of
# the cache.  Small enough that attention never wastes much, large enough to copy rarely.
_COMPACT_MIN_HOLES = 32


@attrs.frozen(eq=False)
class DecodeResult:
    """The outcome of ``decode``.

    Attributes:
      tokens: per row, the generated token ids (prompt excluded), stop token included.
      num_forward_passes: forward passes made for the whole batch.
      forward_passes_per_row: ``(batch,)`` passes during which each row was still decoding.
      accepted_histogram: ``accepted_histogram[n]`` counts row-steps that emitted ``n`` tokens.
      finished_by_stop: ``(batch,)`` True where the row ended on a stop token (or where
        ``stop_criterion`` ended it).
      stop_reasons: per row, why it ended: ``"stop_token"`` (it emitted one of
        ``stop_token_ids``, kept as its last token), ``"stop_criterion"`` (``stop_criterion``
        ended it at its last token) or ``"max_new_tokens"`` (it used its whole budget, a zero
        budget included).  A stop token that is also where the criterion holds, or that is the
        budget's last token, counts as ``"stop_token"``.
    """

    tokens: list[IntArray]
    num_forward_passes: int
    forward_passes_per_row: IntArray
    accepted_histogram: IntArray
    finished_by_stop: BoolArray
    stop_reasons: tuple[StopReason, ...]

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass, averaged over rows (the paper's acceleration factor)."""
        ratios = [
            len(row) / passes
            for row, passes in zip(self.tokens, self.forward_passes_per_row.tolist(), strict=True)
            if passes > 0
        ]
        return float(np.mean(ratios)) if ratios else 0.0


def plan_step(
    blocks: Sequence[Sequence[int]],
    read_starts: Sequence[int],
    read_counts: Sequence[int],
    first_positions: Sequence[int],
    past_visible: BoolArray,
    pad_token_id: int,
) -> StepInputs:
    """Lay out one step's ragged per-row blocks as rectangular arrays.

    Args:
      blocks: per row, the token ids to feed (pending, drafts, masks), at least one each.
      read_starts: per row, index into its block of the first read position.
      read_counts: per row, how many consecutive positions are read from there.
      first_positions: per row, the position id of its block's first token.
      past_visible: ``(batch, past)`` bool, which cached slots each row may attend to.
      pad_token_id: id written into padding slots (never read, never attended by real tokens
        of the row since they come after them).

    Returns:
      ``StepInputs`` whose rows are right-padded to the longest block.  Read indices of rows with
      fewer reads are padded by repeating their last read index.
    """
    batch = len(blocks)
    width = max(len(block) for block in blocks)
    num_reads = max(read_counts)
    token_ids = np.full((batch, width), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((batch, width), dtype=np.int64)
    new_visible = np.zeros((batch, width), dtype=np.bool_)
    read_index = np.zeros((batch, num_reads), dtype=np.int64)
    for row, block in enumerate(blocks):
        length = len(block)
        token_ids[row, :length] = block
        position_ids[row, :length] = first_positions[row] + np.arange(length)
        # Padding slots repeat the last real position: they are never attended (they follow the
        # row's real tokens) and this keeps every id inside the context window.
        position_ids[row, length:] = first_positions[row] + length - 1
        new_visible[row, :length] = True
        reads = read_starts[row] + np.arange(num_reads)
        read_index[row] = np.minimum(reads, read_starts[row] + read_counts[row] - 1)
    attention_mask = np.concatenate([past_visible, new_visible], axis=1)
    return StepInputs(
        token_ids=token_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        read_index=read_index,
    )


@attrs.define
class _Row:
    """Mutable bookkeeping of one sequence while it decodes (private to the loop)."""

    index: int
    next_position: int  # position id of the first pending token
    pending: list[int]
    drafts: list[int] = attrs.field(factory=list)
    generated: list[int] = attrs.field(factory=list)
    passes: int = 0
    stopped: StopReason | None = None  # set when a stop token or the criterion ends the row


@attrs.frozen
class _Rules:
    """What decides a row's tokens, fixed for one ``decode`` call."""

    policy: AcceptancePolicy
    k: int
    verify: bool
    stop: frozenset[int]
    max_new_tokens: int
    stop_criterion: StopCriterion | None


def _validate(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    max_length: int | None,
    mask_token_id: int,
    vocab_size: int | None,
    verify: bool,
    sampling: Sampling,
) -> None:
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt of token ids")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise TypeError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if int(max_new_tokens) < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(
                f"prompt {row} is empty: give at least one token (for example the tokenizer's "
                "BOS token) so the model has a position to predict from"
            )
        if max_length is not None and len(prompt) + max_new_tokens > max_length:
            raise ValueError(
                f"prompt {row} has {len(prompt)} tokens and max_new_tokens={max_new_tokens}, "
                f"together beyond the model's context window of {max_length} positions; "
                "shorten the prompt or lower max_new_tokens"
            )
    if vocab_size is not None and not (0 <= mask_token_id < vocab_size):
        raise ValueError(
            f"mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size}); "
            "convert the model first (MTPModel adds a mask token) or pass the right id"
        )
    if verify and not sampling.greedy:
        raise ValueError(
            "verify=True checks proposals against greedy decoding; use temperature 0 with it, "
            "or verify=False to sample"
        )


def decode(
    backend: Backend[Any],
    prompts: Sequence[Sequence[int]],
    policy: AcceptancePolicy,
    *,
    mask_token_id: int,
    max_new_tokens: int,
    stop_token_ids: Iterable[int] = (),
    verify: bool = False,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    pad_token_id: int = 0,
    max_length: int | None = None,
    vocab_size: int | None = None,
    on_chunk: ChunkCallback | None = None,
    stop_criterion: StopCriterion | None = None,
) -> DecodeResult:
    """Decode a batch of prompts several tokens per forward pass.

    Args:
      backend: executes forward passes; see ``mtp_core.Backend``.
      prompts: per row, the prompt's token ids (no padding), lengths may differ.
      policy: how many proposals to keep per step (``StaticK``, ``ConfAdapt`` ...).
      mask_token_id: id of the ``<mtp_mask>`` token appended ``k - 1`` times per step.
      max_new_tokens: generation budget per row.
      stop_token_ids: a row stops after emitting any of these (the stop token is kept).
      verify: lossless mode; the same weights check the previous step's proposals so the
        output equals greedy decoding exactly.  Requires greedy ``sampling``.
      sampling: greedy (default) or temperature/top-p/top-k sampling of every read position.
      seed: seed of the sampling draws.
      pad_token_id: id used in padding slots of a block.
      max_length: the model's context window; prompts that cannot fit ``max_new_tokens`` more
        raise ``ValueError``.
      vocab_size: if given, ``mask_token_id`` is checked to lie in ``[0, vocab_size)``.
      on_chunk: called as ``on_chunk(row, tokens)`` with each row's newly emitted tokens.
      stop_criterion: called as ``stop_criterion(row, generated)`` after each emitted token, in
        order, with the row's generated tokens so far (that token last); ``True`` ends the row
        there, the token kept, like a stop token.  A step that emits several tokens is checked
        token by token, so the row stops where one-token-per-step decoding would.

    Returns:
      A ``DecodeResult`` with the generated tokens and the step statistics.

    Raises:
      ValueError: on empty prompts, a negative budget, a prompt that cannot fit the context,
        a mask id outside the vocabulary, or ``verify`` with sampling.
    """
    _validate(prompts, max_new_tokens, max_length, mask_token_id, vocab_size, verify, sampling)
    k = int(policy.num_positions)
    rules = _Rules(
        policy, k, verify, frozenset(int(t) for t in stop_token_ids), max_new_tokens, stop_criterion
    )
    rng = np.random.default_rng(seed)
    rows = [
        _Row(index=i, next_position=0, pending=[int(t) for t in prompt])
        for i, prompt in enumerate(prompts)
    ]
    histogram = np.zeros(k + 1, dtype=np.int64)
    active = [row for row in rows if max_new_tokens > 0]
    cache = backend.new_cache(len(active))
    visible = np.zeros((len(active), 0), dtype=np.bool_)
    num_passes = 0

    while active:
        # 1. Plan: pending + drafts + masks per row, clipped so no row writes past its budget.
        inputs, read_counts, mask_counts = _plan(
            active, k, mask_token_id, max_new_tokens, visible, pad_token_id
        )

        # 2. One forward pass for the whole batch.
        step_seed = int(rng.integers(0, 2**31 - 1))
        outputs, cache = backend.forward(cache, inputs, sampling, step_seed)
        num_passes += 1

        # 3. Accept per row: emit tokens, cut at stops and budget, keep the valid new slots.
        valid_new = _accept(active, outputs, read_counts, mask_counts, rules, histogram, on_chunk)

        # 4. Drop the masks' keys/values: keep slots up to the furthest valid one, holes elsewhere.
        cache, visible = _crop(backend, cache, visible, valid_new)

        # 5. Retire finished rows, compact the cache when holes pile up.
        active, cache, visible = _retire(backend, cache, visible, active, max_new_tokens)

    return _result(rows, num_passes, histogram)


def _result(rows: list[_Row], num_passes: int, histogram: IntArray) -> DecodeResult:
    """The finished rows' tokens, passes and stop reasons (a row no stop ended used its budget)."""
    return DecodeResult(
        tokens=[np.asarray(row.generated, dtype=np.int64) for row in rows],
        num_forward_passes=num_passes,
        forward_passes_per_row=np.asarray([row.passes for row in rows], dtype=np.int64),
        accepted_histogram=histogram,
        finished_by_stop=np.asarray([row.stopped is not None for row in rows], dtype=np.bool_),
        stop_reasons=tuple(row.stopped or "max_new_tokens" for row in rows),
    )


def _plan(
    active: list[_Row],
    k: int,
    mask_token_id: int,
    max_new_tokens: int,
    visible: BoolArray,
    pad_token_id: int,
) -> tuple[StepInputs, list[int], list[int]]:
    """Each row's block (pending + drafts + masks), clipped to its remaining budget, laid out.

    Returns ``(inputs, read_counts, mask_counts)``: the step's ``plan_step`` layout, and per row
    how many positions it reads and how many masks it fed.  A row's drafts are cut to its
    budget in place.
    """
    blocks: list[list[int]] = []
    read_starts: list[int] = []
    read_counts: list[int] = []
    mask_counts: list[int] = []
    for row in active:
        remaining = max_new_tokens - len(row.generated)
        drafts = row.drafts[: max(remaining - 1, 0)]
        row.drafts = drafts
        num_masks = max(min(k - 1, remaining - 1 - len(drafts)), 0)
        blocks.append(row.pending + drafts + [mask_token_id] * num_masks)
        read_starts.append(len(row.pending) - 1)
        read_counts.append(1 + len(drafts) + num_masks)
        mask_counts.append(num_masks)
    next_positions = [row.next_position for row in active]
    inputs = plan_step(blocks, read_starts, read_counts, next_positions, visible, pad_token_id)
    return inputs, read_counts, mask_counts


def _crop(
    backend: Backend[Any], cache: Any, visible: BoolArray, valid_new: IntArray
) -> tuple[Any, BoolArray]:
    """Crop the cache after the furthest slot any row keeps; the others' extra slots are holes."""
    past = visible.shape[1]
    new_length = past + int(valid_new.max())
    cache = backend.crop(cache, new_length)
    new_visible = np.arange(new_length - past)[None, :] < valid_new[:, None]
    return cache, np.concatenate([visible, new_visible], axis=1)


def _choose(
    row: _Row,
    tokens: IntArray,
    confidences: npt.NDArray[np.float64],
    num_masks: int,
    rules: _Rules,
) -> tuple[list[int], int, list[int]]:
    """One row's accepted tokens, before stops and budget.

    Args:
      row: the row, with the drafts it fed this step.
      tokens: the token read at each of its read positions (last pending, drafts, masks).
      confidences: their top-1 probabilities.
      num_masks: how many mask positions it fed.
      rules: the policy, its width ``k`` and whether drafts are verified.

    Returns:
      ``(emitted, kept_slots, next_drafts)``: the tokens emitted, how many of this step's new
      cache slots stay valid, and the drafts to verify next step.
    """
    policy, k = rules.policy, rules.k
    if not rules.verify:
        keep = int(policy.accept(_pad_to(confidences[None, :], k))[0])
        keep = min(keep, len(tokens))
        return [int(t) for t in tokens[:keep]], len(row.pending), []
    num_drafts = len(row.drafts)
    greedy = tokens[: num_drafts + 1]
    matches = np.asarray(row.drafts, dtype=np.int64) == greedy[:num_drafts]
    matched = int(np.cumprod(matches).sum()) if num_drafts else 0
    emitted = [*row.drafts[:matched], int(greedy[matched])]
    next_drafts: list[int] = []
    if matched == num_drafts and num_masks > 0:
        proposal_conf = _pad_to(confidences[num_drafts:][None, :], k)
        keep = min(int(policy.accept(proposal_conf)[0]), 1 + num_masks)
        next_drafts = [int(t) for t in tokens[num_drafts + 1 : num_drafts + keep]]
    return emitted, len(row.pending) + matched, next_drafts


def _accept(
    active: list[_Row],
    outputs: StepOutputs,
    read_counts: list[int],
    mask_counts: list[int],
    rules: _Rules,
    histogram: IntArray,
    on_chunk: ChunkCallback | None,
) -> IntArray:
    """Accept, emit and advance every row; per row, how many new cache slots stay valid."""
    valid_new = np.zeros(len(active), dtype=np.int64)
    for slot, row in enumerate(active):
        count = read_counts[slot]
        tokens, confidences = outputs.tokens[slot, :count], outputs.confidences[slot, :count]
        chosen = _choose(row, tokens, confidences, mask_counts[slot], rules)
        emitted = _emit(row, chosen, rules)
        histogram[min(len(emitted), rules.k)] += 1
        valid_new[slot] = chosen[1]
        if on_chunk is not None and emitted:
            on_chunk(row.index, np.asarray(emitted, dtype=np.int64))
    return valid_new


def _emit(row: _Row, chosen: tuple[list[int], int, list[int]], rules: _Rules) -> list[int]:
    """Cut ``_choose``'s tokens at stops and the budget and advance the row; the tokens emitted."""
    emitted, kept_slots, next_drafts = chosen
    budget = rules.max_new_tokens - len(row.generated)
    emitted, stopped = _truncate(emitted, rules.stop, budget)
    if rules.stop_criterion is not None:
        keep = _criterion_cut(rules.stop_criterion, row.index, row.generated, emitted)
        # At the chunk's last token a stop token has already ended the row: its reason stands.
        if keep is not None and (stopped is None or keep < len(emitted)):
            emitted, stopped = emitted[:keep], "stop_criterion"
    row.passes += 1
    row.generated.extend(emitted)
    row.next_position += kept_slots
    row.stopped = stopped
    row.pending = emitted[-1:] if rules.verify else emitted
    row.drafts = next_drafts
    return emitted


def _retire(
    backend: Backend[Any],
    cache: Any,
    visible: BoolArray,
    active: list[_Row],
    max_new_tokens: int,
) -> tuple[list[_Row], Any, BoolArray]:
    """Drop finished rows from the batch; compact the cache when holes pile up.

    Returns:
      ``(active, cache, visible)`` for the rows still decoding.
    """
    new_length = visible.shape[1]
    still = [
        slot
        for slot, row in enumerate(active)
        if row.stopped is None and len(row.generated) < max_new_tokens
    ]
    holes = new_length - int(visible.sum(axis=1).min()) if still else 0
    if still and holes > max(_COMPACT_MIN_HOLES, new_length // 4):
        keep_rows = np.asarray(still, dtype=np.int64)
        slots, visible = _compaction(visible[keep_rows])
        cache = backend.reindex(cache, keep_rows, slots)
    elif len(still) < len(active) and still:
        keep_rows = np.asarray(still, dtype=np.int64)
        cache = backend.reindex(cache, keep_rows, None)
        visible = visible[keep_rows]
    return [active[slot] for slot in still], cache, visible


def _pad_to(confidences: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.float64]:
    """Pad ``(1, n)`` confidences with zeros to ``(1, k)`` so every policy sees its own width."""
    if confidences.shape[1] >= k:
        return confidences[:, :k]
    padded = np.zeros((confidences.shape[0], k), dtype=np.float64)
    padded[:, : confidences.shape[1]] = confidences
    return padded


def _truncate(
    emitted: list[int], stop: frozenset[int], budget: int
) -> tuple[list[int], StopReason | None]:
    """Cut a chunk at the first stop token (kept) and at the row's remaining budget.

    Returns the cut chunk and ``"stop_token"`` if it ends on a stop token, else ``None``.
    """
    emitted = emitted[:budget]
    for position, token in enumerate(emitted):
        if token in stop:
            return emitted[: position + 1], "stop_token"
    return emitted, None


def _criterion_cut(
    criterion: StopCriterion, row_index: int, generated: list[int], emitted: list[int]
) -> int | None:
    """How many of ``emitted`` to keep: up to the first token at which ``criterion`` ends the
    row (that token kept), or ``None`` if it holds at none of them."""
    for position in range(len(emitted)):
        so_far = np.asarray([*generated, *emitted[: position + 1]], dtype=np.int64)
        if criterion(row_index, so_far):
            return position + 1
    return None


def _compaction(visible: BoolArray) -> tuple[IntArray, BoolArray]:
    """Slot indices that right-align each row's visible slots, and the new visibility.

    Rows keep their visible slots in order; the shorter rows get invisible filler slots on the
    left (index 0, never attended).
    """
    counts = visible.sum(axis=1)
    length = int(counts.max())
    slots = np.zeros((visible.shape[0], length), dtype=np.int64)
    new_visible = np.zeros((visible.shape[0], length), dtype=np.bool_)
    for row in range(visible.shape[0]):
        kept = np.flatnonzero(visible[row])
        slots[row, length - kept.size :] = kept
        new_visible[row, length - kept.size :] = True
    return slots, new_visible
