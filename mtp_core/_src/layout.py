"""Where tokens, masks, positions and visibility go: the training and inference layouts.

Training packs ``M`` regions into one sequence of ``S`` slots (docs/method.md section 2; Kirchenbauer
et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019, section on training).
Each region is a run of ground-truth ("real") tokens followed by ``k - 1`` mask tokens.  The
ground-truth tokens hidden under one region's masks are repeated, as real tokens, at the start of
the next region, and every slot keeps the position id of the ground-truth token it holds or stands
in for.  With an attention mask that hides every mask span from the real tokens and from the
other spans, each region's ``k`` prediction slots see exactly what one inference step sees: the
region's prefix followed by ``k - 1`` masks at contiguous positions.

A layout is a plan: it is computed once, in numpy, from a frozen and hashable spec, cached, and
returned as read-only integer and boolean arrays.  A backend only moves them to its device.

Example (``S = 11``, ``k = 3``, ``M = 2``, ``offset = 1``: ``G = 7`` real tokens, ``P = 3``;
``r`` = real token with its gt index, ``m`` = mask with the gt index it stands in for)::

    slot      0   1   2   3   4   5   6   7   8   9  10
    kind      r   r   m   m   r   r   r   m   m   r   r
    position  0   1   2   3   2   3   4   5   6   5   6
    predict       ^   ^   ^               ^   ^   ^
"""

from __future__ import annotations

import functools

import attrs
import numpy as np
import numpy.typing as npt

__all__ = [
    "InferenceLayout",
    "TrainingLayout",
    "TrainingLayoutSpec",
    "default_num_regions",
    "inference_layout",
    "student_forcing_pairs",
    "training_layout",
]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Layouts are small for the paper's sizes (S = 160: a 25 kB attention mask) and there are at most
# a few hundred (k, offset) pairs per training run; the bound keeps long sequences from piling up.
_CACHE_SIZE = 512


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


def _read_only(array: npt.NDArray[np.generic]) -> None:
    array.setflags(write=False)


@attrs.frozen
class TrainingLayoutSpec:
    """The hashable description of one packed training sequence.

    Region ``r`` (``r = 0 .. M-1``) ends at the real token of gt index
    ``e_r = P - 1 - offset + r * P``; its ``k - 1`` masks follow that token in the packed sequence.
    The first region is ``offset`` tokens shorter than the others, and real tokens after
    ``e_{M-1}`` (at most ``M - 1 + offset`` of them) follow the last region's masks.

    Args:
      seq_len: ``S``, packed slots per training sequence (real and mask tokens together).
      k: block size of this step (tokens predicted per region), ``k >= 2``.
      num_regions: ``M``, regions per sequence, ``M >= 1``; see ``default_num_regions``.
      offset: shift of the region grid, in ``[0, prefix_len - 1]`` (drawn at random each step).

    Raises:
      ValueError: if an argument is not an integer in its range, if the masks do not leave room
        for real tokens, or if a region's prefix is shorter than ``k``.

    Example:
      >>> spec = TrainingLayoutSpec(seq_len=160, k=16, num_regions=5)
      >>> spec.num_real, spec.prefix_len, spec.window_len
      (85, 17, 101)
    """

    seq_len: int = attrs.field()
    k: int = attrs.field()
    num_regions: int = attrs.field()
    offset: int = attrs.field(default=0)

    @seq_len.validator
    def _check_seq_len(self, attribute: attrs.Attribute[int], value: int) -> None:
        _check_int("seq_len", value, 1)

    @k.validator
    def _check_k(self, attribute: attrs.Attribute[int], value: int) -> None:
        _check_int("k", value, 2)

    @num_regions.validator
    def _check_num_regions(self, attribute: attrs.Attribute[int], value: int) -> None:
        _check_int("num_regions", value, 1)

    @offset.validator
    def _check_offset(self, attribute: attrs.Attribute[int], value: int) -> None:
        _check_int("offset", value, 0)

    def __attrs_post_init__(self) -> None:
        num_masks = int(self.num_regions) * (int(self.k) - 1)
        if self.num_real < 1:
            raise ValueError(
                f"seq_len={self.seq_len} leaves no room for real tokens: {self.num_regions} "
                f"regions of k-1={int(self.k) - 1} masks need {num_masks} slots; use a longer "
                "seq_len, fewer num_regions or a smaller k"
            )
        if self.prefix_len < self.k:
            raise ValueError(
                f"k_max larger than the region: k={self.k} but each of the {self.num_regions} "
                f"regions holds only P={self.prefix_len} real tokens "
                f"(seq_len={self.seq_len} minus {num_masks} mask slots, split {self.num_regions} "
                f"ways) and needs P >= k; lower k_max, use fewer num_regions (e.g. "
                f"default_num_regions(seq_len, k_max)) or a longer seq_len"
            )
        if self.offset > self.prefix_len - 1:
            raise ValueError(
                f"offset must be in [0, prefix_len - 1] = [0, {self.prefix_len - 1}], "
                f"got {self.offset}; draw it uniformly from that range"
            )

    @property
    def num_real(self) -> int:
        """``G = S - M (k - 1)``: ground-truth tokens in the packed sequence."""
        return int(self.seq_len) - int(self.num_regions) * (int(self.k) - 1)

    @property
    def prefix_len(self) -> int:
        """``P = G // M``: real tokens per region (the first region has ``offset`` fewer)."""
        return self.num_real // int(self.num_regions)

    @property
    def window_len(self) -> int:
        """``G + k``: ground-truth tokens the data loader supplies, enough for every target."""
        return self.num_real + int(self.k)


def default_num_regions(seq_len: int, k_max: int) -> int:
    """The paper's region density, ``max(1, S // (2 k_max))`` (``S = 160, k_max = 16`` gives 5).

    Args:
      seq_len: ``S``, packed slots per training sequence, ``>= 1``.
      k_max: the largest block size drawn during training, ``>= 2``.

    Returns:
      ``M``, the number of regions per sequence.

    Example:
      >>> default_num_regions(160, 16)
      5
    """
    _check_int("seq_len", seq_len, 1)
    _check_int("k_max", k_max, 2)
    return max(1, int(seq_len) // (2 * int(k_max)))


@attrs.frozen(eq=False)
class TrainingLayout:
    """The packed training sequence of one ``TrainingLayoutSpec``, as read-only arrays.

    Build one with ``training_layout(spec)``.  With a ground-truth window ``gt`` of
    ``spec.window_len`` token ids, the packed input is ``gt[source_index]`` with the slots where
    ``is_mask`` is true replaced by the mask token id.

    Student forcing (docs/method.md section 3; paper section on the objective): after the student's pass, take its argmax token ids
    at ``predict_index`` (shape ``(M, k)``); the teacher's input is the packed input with mask
    slot ``predict_index[r, j]`` overwritten by the student's token read at
    ``predict_index[r, j - 1]`` (``j = 1 .. k-1``), see ``student_forcing_pairs``.  Because masks
    attend causally within their own span, the teacher's logits at ``predict_index[r, j]`` then
    score the student's token ``j`` given its tokens ``0 .. j-1`` (chain rule).

    Attributes:
      spec: the spec this layout was built from.
      source_index: ``(S,)`` int64; for a real slot its index into the ground-truth window, for a
        mask slot the gt index of the token it stands in for.
      is_mask: ``(S,)`` bool; true at the ``M (k - 1)`` mask slots.
      position_ids: ``(S,)`` int64 position of each slot: the gt index of its token (real) or of
        the token it stands in for (mask), so repeated tokens keep their positions.
      attention_mask: ``(S, S)`` bool, ``[query, key]``, true where the query may attend to the
        key.  Real slots attend causally to real slots and never to masks; a mask of region
        ``r`` attends to every real token at or before ``e_r`` and to the masks of its own span
        up to itself.  Nothing else.
      predict_index: ``(M, k)`` int64 slots whose logits are read: for region ``r``, the slot of
        its last real token ``e_r``, then its ``k - 1`` mask slots.
      target_index: ``(M, k)`` int64 gt-window index of the token each prediction targets,
        ``e_r + 1 + j``.
      real_slots: ``(G,)`` int64 slots of the real tokens in gt order (for a prefix next-token
        loss: the logits at ``real_slots[i]`` target ``gt[i + 1]``).
    """

    spec: TrainingLayoutSpec
    source_index: IntArray
    is_mask: BoolArray
    position_ids: IntArray
    attention_mask: BoolArray
    predict_index: IntArray
    target_index: IntArray
    real_slots: IntArray


def training_layout(spec: TrainingLayoutSpec) -> TrainingLayout:
    """Build (or fetch from the cache) the packed training layout of ``spec``.

    Args:
      spec: the sequence length, block size, region count and grid offset.

    Returns:
      The layout; its arrays are read-only and shared between calls with equal specs.

    Example:
      >>> layout = training_layout(TrainingLayoutSpec(seq_len=11, k=3, num_regions=2, offset=1))
      >>> layout.position_ids.tolist()
      [0, 1, 2, 3, 2, 3, 4, 5, 6, 5, 6]
      >>> layout.predict_index.tolist(), layout.target_index.tolist()
      ([[1, 2, 3], [6, 7, 8]], [[2, 3, 4], [5, 6, 7]])
    """
    if not isinstance(spec, TrainingLayoutSpec):
        raise ValueError(
            f"spec must be a TrainingLayoutSpec, got {type(spec).__name__}; build one with "
            "TrainingLayoutSpec(seq_len=..., k=..., num_regions=..., offset=...)"
        )
    return _training_layout(spec)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _training_layout(spec: TrainingLayoutSpec) -> TrainingLayout:
    k = int(spec.k)
    num_regions = int(spec.num_regions)
    num_real = spec.num_real
    num_span = k - 1

    # 1. The last real token of each region (gt index) and the masks that follow it.
    region_ends = (
        spec.prefix_len - 1 - int(spec.offset) + spec.prefix_len * np.arange(num_regions)
    ).astype(np.int64)
    gt_index = np.arange(num_real, dtype=np.int64)
    real_slots = gt_index + num_span * np.searchsorted(region_ends, gt_index, side="left")
    end_slots = real_slots[region_ends]
    span_offsets = np.arange(1, k, dtype=np.int64)  # 1 .. k-1
    mask_slots = end_slots[:, None] + span_offsets[None, :]  # (M, k-1)

    # 2. Per slot: source / position, mask flag, the region of a mask (-1 for real slots).
    seq_len = int(spec.seq_len)
    source_index = np.empty(seq_len, dtype=np.int64)
    source_index[real_slots] = gt_index
    source_index[mask_slots] = region_ends[:, None] + span_offsets[None, :]
    is_mask = np.zeros(seq_len, dtype=np.bool_)
    is_mask[mask_slots] = True
    mask_region = np.full(seq_len, -1, dtype=np.int64)
    mask_region[mask_slots] = np.arange(num_regions, dtype=np.int64)[:, None]
    position_ids = source_index.copy()

    # 3. Visibility.  Real queries: real keys at or before their position.  Mask queries of
    # region r: real keys at or before e_r, and masks of the same span at or before their own.
    query_pos = position_ids[:, None]
    key_pos = position_ids[None, :]
    real_query = ~is_mask[:, None]
    real_key = ~is_mask[None, :]
    limit = np.where(is_mask, region_ends[np.maximum(mask_region, 0)], position_ids)
    sees_real = real_key & (key_pos <= limit[:, None])
    sees_own_span = (
        ~real_query
        & ~real_key
        & (mask_region[:, None] == mask_region[None, :])
        & (key_pos <= query_pos)
    )
    attention_mask = sees_real | sees_own_span

    # 4. Read-outs: the last real slot then the masks; targets e_r + 1 + j.
    predict_index = np.concatenate([end_slots[:, None], mask_slots], axis=1)
    target_index = region_ends[:, None] + 1 + np.arange(k, dtype=np.int64)[None, :]

    arrays = (
        source_index,
        is_mask,
        position_ids,
        attention_mask,
        predict_index,
        target_index,
        real_slots,
    )
    for array in arrays:
        _read_only(array)
    return TrainingLayout(
        spec=spec,
        source_index=source_index,
        is_mask=is_mask,
        position_ids=position_ids,
        attention_mask=attention_mask,
        predict_index=predict_index,
        target_index=target_index,
        real_slots=real_slots,
    )


def student_forcing_pairs(layout: TrainingLayout) -> tuple[IntArray, IntArray]:
    """Which student prediction fills which mask slot of the teacher's input.

    The student's argmax tokens at the prediction slots, ``tokens`` of shape ``(..., M, k)``
    (read at ``layout.predict_index``), are written into the packed input as
    ``forced[..., dst_slots] = tokens.reshape(..., M * k)[..., src_reads]``: mask ``j`` of
    region ``r`` receives the token read at column ``j - 1`` of the same region.

    Args:
      layout: a training layout.

    Returns:
      ``(dst_slots, src_reads)``, both ``(M, k - 1)`` int64 and read-only: the packed slot of
      each mask, and the flat index ``r * k + j - 1`` into the ``(M, k)`` read-outs that
      supplies it.
    """
    k = int(layout.spec.k)
    num_regions = int(layout.spec.num_regions)
    dst_slots = layout.predict_index[:, 1:]
    src_reads = (
        np.arange(num_regions, dtype=np.int64)[:, None] * k
        + np.arange(k - 1, dtype=np.int64)[None, :]
    )
    _read_only(src_reads)
    return dst_slots, src_reads


@attrs.frozen(eq=False)
class InferenceLayout:
    """One inference step: a prefix followed by ``k - 1`` masks at contiguous positions.

    Build one with ``inference_layout(prefix_len, k)``; the arrays are read-only.

    Attributes:
      prefix_len: real tokens before the masks.
      k: tokens predicted (read positions).
      position_ids: ``(prefix_len + k - 1,)`` int64, ``0, 1, ...``.
      is_mask: ``(prefix_len + k - 1,)`` bool, true at the last ``k - 1`` slots.
      attention_mask: ``(L, L)`` bool ``[query, key]``, the ordinary causal mask.
      read_index: ``(k,)`` int64 slots whose logits give the ``k`` next tokens,
        ``prefix_len - 1 .. prefix_len + k - 2``.
    """

    prefix_len: int
    k: int
    position_ids: IntArray
    is_mask: BoolArray
    attention_mask: BoolArray
    read_index: IntArray


def inference_layout(prefix_len: int, k: int) -> InferenceLayout:
    """Build (or fetch from the cache) the layout of one inference step.

    Args:
      prefix_len: real tokens in the prefix, ``>= 1``.
      k: tokens predicted, ``>= 1`` (``k - 1`` masks are appended).

    Returns:
      The layout; its arrays are read-only.

    Example:
      >>> inference_layout(3, 2).read_index.tolist()
      [2, 3]
    """
    # Validate before the cache: True == 1 would otherwise hit the entry of prefix_len=1.
    _check_int("prefix_len", prefix_len, 1)
    _check_int("k", k, 1)
    return _inference_layout(int(prefix_len), int(k))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _inference_layout(prefix_len: int, k: int) -> InferenceLayout:
    length = prefix_len + k - 1
    position_ids = np.arange(length, dtype=np.int64)
    is_mask = position_ids >= prefix_len
    attention_mask = np.tril(np.ones((length, length), dtype=np.bool_))
    read_index = np.arange(prefix_len - 1, length, dtype=np.int64)
    for array in (position_ids, is_mask, attention_mask, read_index):
        _read_only(array)
    return InferenceLayout(
        prefix_len=prefix_len,
        k=k,
        position_ids=position_ids,
        is_mask=is_mask,
        attention_mask=attention_mask,
        read_index=read_index,
    )
