"""The decode engine on an exact toy backend: equivalence, batching, holes, budgets, statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtp_core import ConfAdapt, Sampling, StaticK, decode
from tests import strategies as S
from tests.toy_backend import ToyBackend, toy_greedy, toy_mtp_reference

VOCAB = 3  # small, so drafts often match by chance and every verify branch is reached
MASK = 7  # outside the toy vocabulary: the toy model never emits it


def _run(prompts, policy, *, verify=False, max_new_tokens=12, stop=(), **kwargs):
    backend = ToyBackend(vocab_size=VOCAB)
    result = decode(
        backend,
        prompts,
        policy,
        mask_token_id=MASK,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop,
        verify=verify,
        **kwargs,
    )
    return result, backend


@given(
    prompts=S.prompt_batches(vocab_size=VOCAB, max_batch=4),
    max_new_tokens=st.integers(0, 20),
    stop=st.sampled_from([(), (0,), (2,)]),
)
def test_static_one_equals_greedy(prompts, max_new_tokens, stop):
    result, _ = _run(prompts, StaticK(1), max_new_tokens=max_new_tokens, stop=stop)
    for prompt, tokens in zip(prompts, result.tokens, strict=True):
        assert tokens.tolist() == toy_greedy(prompt, max_new_tokens, frozenset(stop), VOCAB)


@given(
    prompts=S.prompt_batches(vocab_size=VOCAB, max_batch=4),
    policy=S.policies,
    max_new_tokens=st.integers(1, 24),
    stop=st.sampled_from([(), (0,), (1,)]),
)
def test_verify_equals_greedy_for_any_policy(prompts, policy, max_new_tokens, stop):
    result, backend = _run(prompts, policy, verify=True, max_new_tokens=max_new_tokens, stop=stop)
    for prompt, tokens in zip(prompts, result.tokens, strict=True):
        assert tokens.tolist() == toy_greedy(prompt, max_new_tokens, frozenset(stop), VOCAB)
    assert result.num_forward_passes == backend.forward_calls
    # Verification never costs more passes than plain greedy decoding.
    assert result.num_forward_passes <= max(len(t) for t in result.tokens)


@given(
    prompts=S.prompt_batches(vocab_size=VOCAB, max_batch=4, max_len=8),
    policy=S.policies,
    max_new_tokens=st.integers(1, 30),
    stop=st.sampled_from([(), (2,)]),
)
def test_unverified_matches_single_row_definition(prompts, policy, max_new_tokens, stop):
    # Ragged acceptance across rows creates holes and compaction; each row must still equal
    # the from-scratch definition of MTP decoding for that row alone.
    result, _ = _run(prompts, policy, max_new_tokens=max_new_tokens, stop=stop)
    for prompt, tokens in zip(prompts, result.tokens, strict=True):
        expected = toy_mtp_reference(
            prompt, policy.num_positions, policy.accept, max_new_tokens, frozenset(stop), MASK, VOCAB
        )
        assert tokens.tolist() == expected


@given(prompts=S.prompt_batches(vocab_size=VOCAB, max_batch=4), policy=S.policies, verify=st.booleans())
def test_batch_equals_one_by_one(prompts, policy, verify):
    batched, _ = _run(prompts, policy, verify=verify, max_new_tokens=15)
    for row, prompt in enumerate(prompts):
        single, _ = _run([prompt], policy, verify=verify, max_new_tokens=15)
        assert batched.tokens[row].tolist() == single.tokens[0].tolist()
        assert batched.forward_passes_per_row[row] == single.forward_passes_per_row[0]


def test_compaction_reached_with_long_ragged_runs():
    # Rows accept different numbers of tokens per step, so holes pile up until the cache is
    # compacted; every row must still match its single-row definition.
    prompts = [[0, 1, 2], [2, 2], [1]]
    policy = ConfAdapt(threshold=0.4, k_max=8)
    result, backend = _run(prompts, policy, max_new_tokens=300)
    for prompt, tokens in zip(prompts, result.tokens, strict=True):
        assert tokens.tolist() == toy_mtp_reference(prompt, 8, policy.accept, 300, frozenset(), MASK, VOCAB)
    assert backend.compactions > 0
    assert result.tokens_per_forward > 1.2


def test_statistics_are_consistent():
    prompts = [[0, 1], [1, 1, 1, 2]]
    result, backend = _run(prompts, ConfAdapt(threshold=0.5, k_max=4), max_new_tokens=20)
    hist = result.accepted_histogram
    assert int((hist * np.arange(hist.size)).sum()) == sum(len(t) for t in result.tokens)
    assert int(hist.sum()) == int(result.forward_passes_per_row.sum())
    assert result.num_forward_passes == backend.forward_calls == int(result.forward_passes_per_row.max())
    per_row = [len(t) / p for t, p in zip(result.tokens, result.forward_passes_per_row, strict=True)]
    assert result.tokens_per_forward == pytest.approx(float(np.mean(per_row)))


def test_static_k_emits_k_tokens_per_pass():
    result, _ = _run([[1, 2, 0]], StaticK(4), max_new_tokens=16)
    assert len(result.tokens[0]) == 16
    assert result.num_forward_passes == 4
    assert result.accepted_histogram[4] == 4


def test_stop_token_ends_row_and_is_kept():
    prompt = [0, 1, 2, 0]
    greedy = toy_greedy(prompt, 30, frozenset(), VOCAB)
    stop_token = greedy[5]
    result, _ = _run([prompt], StaticK(3), max_new_tokens=30, stop=(stop_token,))
    tokens = result.tokens[0].tolist()
    assert tokens[-1] == stop_token and stop_token not in tokens[:-1]
    assert bool(result.finished_by_stop[0])


def test_streaming_callback_receives_every_token_in_order():
    chunks: dict[int, list[int]] = {0: [], 1: []}
    result, _ = _run(
        [[0, 1], [2]],
        ConfAdapt(0.3, 5),
        max_new_tokens=17,
        on_chunk=lambda row, toks: chunks[row].extend(toks.tolist()),
    )
    assert chunks[0] == result.tokens[0].tolist()
    assert chunks[1] == result.tokens[1].tolist()


def test_zero_budget_makes_no_forward_pass():
    result, backend = _run([[1, 2]], ConfAdapt(), max_new_tokens=0)
    assert result.tokens[0].size == 0 and backend.forward_calls == 0


@pytest.mark.parametrize(
    ("prompts", "kwargs", "match"),
    [
        ([[]], {}, "prompt 0 is empty"),
        ([], {}, "no prompts"),
        ([[1, 2, 3]], {"max_length": 10, "max_new_tokens": 8}, "context window"),
        ([[1]], {"vocab_size": 5}, "outside the vocabulary"),
        ([[1]], {"max_new_tokens": -1}, "max_new_tokens"),
        ([[1]], {"verify": True, "sampling": Sampling(temperature=0.7)}, "verify=True"),
    ],
)
def test_bad_input_raises_actionable_errors(prompts, kwargs, match):
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        decode(ToyBackend(), prompts, StaticK(2), mask_token_id=MASK, **kwargs)
