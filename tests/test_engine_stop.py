"""The engine's per-token ``stop_criterion`` on the exact toy backend.

A step may emit several tokens; the criterion is asked after each of them, so a row ends at the
first token where it holds, exactly where one-token-per-step decoding would end it.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from mtp_core import ConfAdapt, StaticK, decode
from tests import strategies as S
from tests.toy_backend import ToyBackend, toy_greedy, toy_mtp_reference

VOCAB = 3
MASK = 7


def _run(prompts, policy, criterion, *, verify=False, max_new_tokens=16, stop=()):
    return decode(
        ToyBackend(vocab_size=VOCAB),
        prompts,
        policy,
        mask_token_id=MASK,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop,
        verify=verify,
        stop_criterion=criterion,
    )


def _cut(tokens: list[int], stops_at) -> list[int]:
    """``tokens`` up to and including the first prefix end where ``stops_at(prefix)`` holds."""
    for end in range(1, len(tokens) + 1):
        if stops_at(tokens[:end]):
            return tokens[:end]
    return tokens


def _reason(tokens: list[int], stop, stops_at) -> str:
    """Why a row with these tokens ended: its last token is a stop token, or the criterion
    first holds there, or else it used its budget."""
    if tokens and tokens[-1] in stop:
        return "stop_token"
    return "stop_criterion" if stops_at(tokens) else "max_new_tokens"


def _pattern_criterion(pattern: tuple[int, ...]):
    """Stops a row when its generated tokens end with ``pattern`` (a toy 'stop string')."""

    def stops_at(tokens) -> bool:
        return len(tokens) >= len(pattern) and tuple(tokens[-len(pattern) :]) == pattern

    return stops_at, (lambda row, generated: stops_at(generated.tolist()))


@given(
    prompts=S.prompt_batches(vocab_size=VOCAB, max_batch=4),
    policy=S.policies,
    pattern=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3).map(tuple),
    stop=st.sampled_from([(), (2,)]),
)
def test_verified_and_static_one_stop_where_greedy_stops(prompts, policy, pattern, stop):
    stops_at, criterion = _pattern_criterion(pattern)
    for chosen, verify in ((StaticK(1), False), (StaticK(1), True), (policy, True)):
        result = _run(prompts, chosen, criterion, verify=verify, stop=stop)
        for prompt, tokens in zip(prompts, result.tokens, strict=True):
            greedy = toy_greedy(prompt, 16, frozenset(stop), VOCAB)
            assert tokens.tolist() == _cut(greedy, stops_at)
        expected = [_reason(tokens.tolist(), stop, stops_at) for tokens in result.tokens]
        assert list(result.stop_reasons) == expected
        assert result.finished_by_stop.tolist() == [r != "max_new_tokens" for r in expected]


@given(
    prompts=S.prompt_batches(vocab_size=VOCAB, max_batch=4),
    policy=S.policies,
    pattern=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3).map(tuple),
)
def test_unverified_steps_are_cut_token_by_token(prompts, policy, pattern):
    """A multi-token step is cut inside the chunk, at the first token where the criterion holds."""
    stops_at, criterion = _pattern_criterion(pattern)
    result = _run(prompts, policy, criterion)
    for row, (prompt, tokens) in enumerate(zip(prompts, result.tokens, strict=True)):
        free = toy_mtp_reference(
            prompt, policy.num_positions, policy.accept, 16, frozenset(), MASK, VOCAB
        )
        expected = _cut(free, stops_at)
        assert tokens.tolist() == expected
        assert bool(result.finished_by_stop[row]) == stops_at(expected)
        assert result.stop_reasons[row] == _reason(expected, (), stops_at)


def test_criterion_sees_each_rows_tokens_growing_one_at_a_time():
    calls: dict[int, list[list[int]]] = {0: [], 1: []}

    def criterion(row: int, generated: np.ndarray) -> bool:
        assert generated.dtype == np.int64
        calls[row].append(generated.tolist())
        return len(generated) == 5

    result = _run([[0, 1], [2]], StaticK(4), criterion, max_new_tokens=12)
    for row in (0, 1):
        assert len(result.tokens[row]) == 5 and bool(result.finished_by_stop[row])
        assert calls[row] == [result.tokens[row][:n].tolist() for n in range(1, 6)]
    # The chunk of the stopping step is cut: 4 + 1 tokens, and the histogram counts the 1.
    assert result.accepted_histogram[4] == 2 and result.accepted_histogram[1] == 2


def test_no_criterion_changes_nothing():
    prompts = [[0, 1, 2], [1]]
    policy = ConfAdapt(0.4, 5)
    plain = decode(ToyBackend(VOCAB), prompts, policy, mask_token_id=MASK, max_new_tokens=20)
    never = _run(prompts, policy, lambda row, generated: False, max_new_tokens=20)
    for a, b in zip(plain.tokens, never.tokens, strict=True):
        assert a.tolist() == b.tolist()
    assert plain.num_forward_passes == never.num_forward_passes


def test_rows_that_end_for_different_reasons_report_their_own():
    """One batch: a row ends on a stop token, one by the criterion inside a step, one at its
    budget; each reports its own reason and the passes it took part in."""
    backend = ToyBackend(vocab_size=1000)  # a wide vocabulary: a stop token one row alone meets
    prompts = [[0, 1], [2], [1, 1, 0]]
    free = decode(backend, prompts, StaticK(3), mask_token_id=1001, max_new_tokens=10)
    stop_token = int(free.tokens[0][4])  # row 0 ends at its 5th token, in its second step
    assert stop_token not in free.tokens[0][:4].tolist()
    assert stop_token not in [*free.tokens[1].tolist(), *free.tokens[2].tolist()]
    result = decode(
        backend,
        prompts,
        StaticK(3),
        mask_token_id=1001,
        max_new_tokens=10,
        stop_token_ids=[stop_token],
        stop_criterion=lambda row, generated: row == 1 and len(generated) == 7,
    )
    for row, length in enumerate((5, 7, 10)):
        assert result.tokens[row].tolist() == free.tokens[row][:length].tolist()
    assert result.stop_reasons == ("stop_token", "stop_criterion", "max_new_tokens")
    # Three tokens a step: 5 tokens take 2 passes, 7 take 3, 10 take 4.
    assert result.forward_passes_per_row.tolist() == [2, 3, 4]
    assert result.num_forward_passes == 4
    assert result.finished_by_stop.tolist() == [True, True, False]
    # A stop token that is also the budget's last token, or where the criterion holds, counts
    # as the stop token.
    last = decode(
        backend,
        prompts[:1],
        StaticK(3),
        mask_token_id=1001,
        max_new_tokens=5,
        stop_token_ids=[stop_token],
        stop_criterion=lambda row, generated: len(generated) == 5,
    )
    assert last.stop_reasons == ("stop_token",) and len(last.tokens[0]) == 5


def test_a_zero_budget_ends_every_row_at_its_budget():
    result = _run([[0, 1], [2]], StaticK(2), None, max_new_tokens=0)
    assert result.stop_reasons == ("max_new_tokens", "max_new_tokens")
    assert result.forward_passes_per_row.tolist() == [0, 0]
