"""Properties of the packed training layout and the inference layout (docs/method.md sections 1-2)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtp_core._src.layout import (
    TrainingLayout,
    TrainingLayoutSpec,
    default_num_regions,
    inference_layout,
    student_forcing_pairs,
    training_layout,
)
from tests.strategies import training_layout_specs


def _region_ends(spec: TrainingLayoutSpec) -> list[int]:
    """e_r from the rule text: P - 1 - offset + r * P."""
    return [
        spec.prefix_len - 1 - spec.offset + r * spec.prefix_len for r in range(spec.num_regions)
    ]


def _reference(spec: TrainingLayoutSpec) -> dict[str, np.ndarray]:
    """The layout built slot by slot with plain loops, straight from the rule text."""
    ends = _region_ends(spec)
    slots: list[tuple[bool, int, int]] = []  # (is_mask, gt index / stood-in index, region)
    for i in range(spec.num_real):
        slots.append((False, i, -1))
        if i in ends:
            r = ends.index(i)
            slots.extend((True, i + j, r) for j in range(1, spec.k))
    size = len(slots)
    visible = np.zeros((size, size), dtype=bool)
    for q, (q_mask, q_src, q_region) in enumerate(slots):
        for key, (k_mask, k_src, k_region) in enumerate(slots):
            if not q_mask:
                visible[q, key] = (not k_mask) and k_src <= q_src
            elif not k_mask:
                visible[q, key] = k_src <= ends[q_region]
            else:
                visible[q, key] = k_region == q_region and k_src <= q_src
    return {
        "source_index": np.array([s for _, s, _ in slots]),
        "is_mask": np.array([m for m, _, _ in slots]),
        "attention_mask": visible,
    }


def _visible_items(layout: TrainingLayout, query: int) -> set[tuple[object, ...]]:
    """What ``query`` sees, identified by content: real tokens by gt index, masks by span offset.

    A mask's span offset and span anchor are recovered from the packed order alone (the run of
    masks since the previous real slot), not from its position id.
    """
    items: set[tuple[object, ...]] = set()
    for key in np.flatnonzero(layout.attention_mask[query]).tolist():
        if not layout.is_mask[key]:
            items.add(("real", int(layout.source_index[key]), int(layout.position_ids[key])))
            continue
        anchor = key
        while layout.is_mask[anchor]:
            anchor -= 1
        items.add(
            (
                "mask",
                int(layout.source_index[anchor]),
                key - anchor,
                int(layout.position_ids[key]),
            )
        )
    return items


# --- structure -----------------------------------------------------------------------------------


def test_reference_sizes() -> None:
    spec = TrainingLayoutSpec(seq_len=160, k=16, num_regions=default_num_regions(160, 16))
    assert (spec.num_regions, spec.num_real, spec.prefix_len, spec.window_len) == (5, 85, 17, 101)
    assert spec.prefix_len == 32 - (spec.k - 1)  # the paper's P = 32 - (k - 1)
    layout = training_layout(spec)
    assert layout.predict_index.shape == (5, 16)
    # With offset 0 the last target is the last token the data loader supplies.
    assert int(layout.target_index.max()) == spec.window_len - 1


@given(training_layout_specs())
def test_matches_loop_reference(spec: TrainingLayoutSpec) -> None:
    layout = training_layout(spec)
    reference = _reference(spec)
    np.testing.assert_array_equal(layout.source_index, reference["source_index"])
    np.testing.assert_array_equal(layout.is_mask, reference["is_mask"])
    np.testing.assert_array_equal(layout.attention_mask, reference["attention_mask"])


@given(training_layout_specs())
def test_counts_dtypes_and_read_only(spec: TrainingLayoutSpec) -> None:
    layout = training_layout(spec)
    seq_len, k, regions = spec.seq_len, spec.k, spec.num_regions
    assert (
        layout.source_index.shape == layout.position_ids.shape == layout.is_mask.shape == (seq_len,)
    )
    assert layout.attention_mask.shape == (seq_len, seq_len)
    assert layout.predict_index.shape == layout.target_index.shape == (regions, k)
    assert layout.real_slots.shape == (spec.num_real,)
    assert int(layout.is_mask.sum()) == regions * (k - 1)
    for array in (
        layout.source_index,
        layout.position_ids,
        layout.predict_index,
        layout.target_index,
        layout.real_slots,
    ):
        assert array.dtype == np.int64
    for any_array in (
        layout.source_index,
        layout.is_mask,
        layout.position_ids,
        layout.attention_mask,
        layout.predict_index,
        layout.target_index,
        layout.real_slots,
    ):
        assert not any_array.flags.writeable
        with pytest.raises(ValueError):
            any_array.flat[0] = any_array.flat[0]


@given(training_layout_specs())
def test_real_tokens_keep_their_positions(spec: TrainingLayoutSpec) -> None:
    layout = training_layout(spec)
    gt = np.arange(spec.num_real)
    assert np.all(np.diff(layout.real_slots) > 0)
    assert not layout.is_mask[layout.real_slots].any()
    np.testing.assert_array_equal(np.flatnonzero(~layout.is_mask), layout.real_slots)
    np.testing.assert_array_equal(layout.source_index[layout.real_slots], gt)
    np.testing.assert_array_equal(layout.position_ids[layout.real_slots], gt)
    # Every slot's position is the gt index of its token or of the token it stands in for.
    np.testing.assert_array_equal(layout.position_ids, layout.source_index)
    # A token hidden under masks reappears as a real token at the same position.
    stood_in = set(layout.source_index[layout.is_mask].tolist())
    repeated = stood_in & set(gt.tolist())
    assert repeated == {s for s in stood_in if s < spec.num_real}


@given(training_layout_specs())
def test_masks_follow_each_region_end(spec: TrainingLayoutSpec) -> None:
    layout = training_layout(spec)
    ends = _region_ends(spec)
    assert ends[-1] <= spec.num_real - 1
    for r, end in enumerate(ends):
        end_slot, *mask_slots = layout.predict_index[r].tolist()
        assert not layout.is_mask[end_slot]
        assert layout.source_index[end_slot] == end
        assert mask_slots == list(range(end_slot + 1, end_slot + spec.k))
        assert layout.is_mask[mask_slots].all()
        np.testing.assert_array_equal(layout.position_ids[mask_slots], end + np.arange(1, spec.k))
    # The stood-in tokens are the gt tokens that follow the masks (the next region's start).
    assert int(layout.source_index.max()) <= spec.window_len - 2
    assert int(layout.target_index.max()) <= spec.window_len - 1


@given(training_layout_specs())
def test_attention_rules(spec: TrainingLayoutSpec) -> None:
    layout = training_layout(spec)
    visible = layout.attention_mask
    is_mask = layout.is_mask
    pos = layout.position_ids
    # Every slot sees itself; no slot sees a later slot or a later position.
    assert visible.diagonal().all()
    assert not np.triu(visible, 1).any()
    assert not (visible & (pos[None, :] > pos[:, None])).any()
    # Real slots never see masks, and see every earlier real slot.
    assert not visible[np.ix_(~is_mask, is_mask)].any()
    real = layout.real_slots
    np.testing.assert_array_equal(
        visible[np.ix_(real, real)], np.tril(np.ones((real.size,) * 2, bool))
    )
    # A mask sees the masks of its own span up to itself and no other mask; it sees the real
    # tokens at or before its region's last real token, and no later one.
    spans = layout.predict_index[:, 1:]
    for r, span in enumerate(spans.tolist()):
        end = int(layout.source_index[layout.predict_index[r, 0]])
        other_masks = np.setdiff1d(np.flatnonzero(is_mask), span)
        assert not visible[np.ix_(span, other_masks)].any()
        np.testing.assert_array_equal(
            visible[np.ix_(span, span)], np.tril(np.ones((len(span),) * 2, bool))
        )
        np.testing.assert_array_equal(
            visible[np.ix_(span, real)],
            np.broadcast_to(np.arange(spec.num_real) <= end, (len(span), real.size)),
        )


@given(training_layout_specs())
def test_predictions_and_targets(spec: TrainingLayoutSpec) -> None:
    layout = training_layout(spec)
    k = spec.k
    predict, target = layout.predict_index, layout.target_index
    ends = np.asarray(_region_ends(spec))
    np.testing.assert_array_equal(target, ends[:, None] + 1 + np.arange(k)[None, :])
    # Each prediction slot targets the token one position after its own.
    np.testing.assert_array_equal(target, layout.position_ids[predict] + 1)
    assert np.all(target < spec.window_len)
    assert not layout.is_mask[predict[:, 0]].any()
    assert layout.is_mask[predict[:, 1:]].all()
    # Regions' predictions never overlap in the packed sequence.
    assert np.unique(predict).size == predict.size


@given(training_layout_specs())
def test_student_forcing_pairs(spec: TrainingLayoutSpec) -> None:
    layout = training_layout(spec)
    dst_slots, src_reads = student_forcing_pairs(layout)
    assert dst_slots.shape == src_reads.shape == (spec.num_regions, spec.k - 1)
    np.testing.assert_array_equal(dst_slots, layout.predict_index[:, 1:])
    assert layout.is_mask[dst_slots].all()
    # The token written into a mask is the student's prediction for the position the mask holds,
    # made in the same region.
    np.testing.assert_array_equal(
        layout.target_index.reshape(-1)[src_reads], layout.position_ids[dst_slots]
    )
    np.testing.assert_array_equal(
        src_reads // spec.k, np.arange(spec.num_regions)[:, None].repeat(spec.k - 1, 1)
    )
    # Applying the pairs to fake student tokens writes each region's columns 0..k-2 into its masks.
    tokens = np.arange(spec.num_regions * spec.k).reshape(spec.num_regions, spec.k) + 1000
    forced = np.where(layout.is_mask, -1, layout.source_index)
    forced[dst_slots] = tokens.reshape(-1)[src_reads]
    np.testing.assert_array_equal(forced[layout.predict_index[:, 1:]], tokens[:, :-1])
    assert (forced >= 0).all()


# --- the key property: packed predictions see what inference sees --------------------------------


@given(training_layout_specs())
def test_each_region_sees_what_inference_sees(spec: TrainingLayoutSpec) -> None:
    layout = training_layout(spec)
    for r in range(spec.num_regions):
        end = int(layout.source_index[layout.predict_index[r, 0]])
        step = inference_layout(end + 1, spec.k)
        assert step.read_index.shape == (spec.k,)
        for j in range(spec.k):
            query = int(layout.predict_index[r, j])
            inference_query = int(step.read_index[j])
            expected: set[tuple[object, ...]] = set()
            for key in np.flatnonzero(step.attention_mask[inference_query]).tolist():
                position = int(step.position_ids[key])
                if step.is_mask[key]:
                    expected.add(("mask", end, key - step.prefix_len + 1, position))
                else:
                    expected.add(("real", key, position))
            assert _visible_items(layout, query) == expected
            assert layout.position_ids[query] == step.position_ids[inference_query]
            assert layout.is_mask[query] == step.is_mask[inference_query]


def test_inference_layout() -> None:
    step = inference_layout(4, 3)
    assert step.position_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert step.is_mask.tolist() == [False] * 4 + [True] * 2
    assert step.read_index.tolist() == [3, 4, 5]
    np.testing.assert_array_equal(step.attention_mask, np.tril(np.ones((6, 6), bool)))
    assert inference_layout(1, 1).read_index.tolist() == [0]
    assert inference_layout(4, 3) is step
    assert not step.read_index.flags.writeable
    inference_layout(1, 2)  # cached; True == 1 must still be rejected
    for bad in [(0, 3), (3, 0), (2.5, 2), (True, 2)]:
        with pytest.raises(ValueError):
            inference_layout(*bad)  # type: ignore[arg-type]


# --- validation, hashing, caching ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 160, "k": 1, "num_regions": 5}, "k must be an integer >= 2"),
        ({"seq_len": 160, "k": 16, "num_regions": 0}, "num_regions must be an integer >= 1"),
        ({"seq_len": 0, "k": 2, "num_regions": 1}, "seq_len must be an integer >= 1"),
        (
            {"seq_len": 160, "k": 16, "num_regions": 5, "offset": -1},
            "offset must be an integer >= 0",
        ),
        (
            {"seq_len": 160, "k": 16, "num_regions": 5, "offset": 17},
            r"offset must be in \[0, prefix_len - 1\]",
        ),
        ({"seq_len": 160, "k": 20, "num_regions": 5}, "k_max larger than the region"),
        ({"seq_len": 160, "k": 17, "num_regions": 5}, "k_max larger than the region"),
        ({"seq_len": 10, "k": 6, "num_regions": 2}, "leaves no room for real tokens"),
        ({"seq_len": 160.0, "k": 16, "num_regions": 5}, "seq_len must be an integer"),
        ({"seq_len": 160, "k": True, "num_regions": 5}, "k must be an integer"),
    ],
)
def test_spec_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingLayoutSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_boundaries_accepted() -> None:
    assert TrainingLayoutSpec(seq_len=160, k=16, num_regions=5, offset=16).offset == 16
    assert TrainingLayoutSpec(seq_len=3, k=2, num_regions=1).prefix_len == 2


def test_spec_hashable_and_layout_cached() -> None:
    spec = TrainingLayoutSpec(seq_len=40, k=4, num_regions=2, offset=3)
    same = TrainingLayoutSpec(seq_len=40, k=4, num_regions=2, offset=3)
    assert spec == same and hash(spec) == hash(same)
    assert len({spec, same, TrainingLayoutSpec(seq_len=40, k=4, num_regions=2)}) == 2
    assert training_layout(spec) is training_layout(same)
    assert training_layout(spec) is not training_layout(
        TrainingLayoutSpec(seq_len=40, k=4, num_regions=2)
    )
    with pytest.raises(AttributeError):
        spec.k = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="TrainingLayoutSpec"):
        training_layout((40, 4, 2))  # type: ignore[arg-type]


@given(st.integers(min_value=2, max_value=24), st.integers(min_value=0, max_value=200))
def test_default_num_regions_fits_every_k(k_max: int, extra: int) -> None:
    seq_len = 2 * k_max + extra
    regions = default_num_regions(seq_len, k_max)
    assert regions == max(1, seq_len // (2 * k_max))
    for k in range(2, k_max + 1):
        prefix_len = TrainingLayoutSpec(seq_len=seq_len, k=k, num_regions=regions).prefix_len
        assert prefix_len >= k
        TrainingLayoutSpec(seq_len=seq_len, k=k, num_regions=regions, offset=prefix_len - 1)


def test_default_num_regions() -> None:
    assert default_num_regions(160, 16) == 5
    assert default_num_regions(10, 16) == 1
    with pytest.raises(ValueError, match="k_max"):
        default_num_regions(160, 1)
