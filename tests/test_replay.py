"""Replaying policies from one recording (mtp_core.replay) against decoding them for real."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtp_core import ConfAdapt, ProposalTable, StaticK, decode, record_proposals, replay
from mtp_torch import MTPModel
from mtp_torch.decoding.gated import add_mask_gate
from tests import strategies as S
from tests.synthetic import tiny_llama
from tests.toy_backend import ToyBackend, toy_greedy

VOCAB = 3
MASK = 7


class _Widths(ToyBackend):
    """The toy backend, noting each pass's width."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        self.widths: list[int] = []

    def forward(self, cache, inputs, sampling, seed):  # type: ignore[no-untyped-def]
        self.widths.append(int(inputs.token_ids.shape[1]))
        return super().forward(cache, inputs, sampling, seed)


def _decoded(prompt, policy, verify, max_new_tokens, stop):  # type: ignore[no-untyped-def]
    backend = _Widths()
    result = decode(
        backend, [prompt], policy, mask_token_id=MASK, max_new_tokens=max_new_tokens,
        stop_token_ids=stop, verify=verify,
    )  # fmt: skip
    return result, backend.widths


@given(
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
    policy=S.policies,
    extra=st.integers(0, 2),
    max_new_tokens=st.integers(0, 24),
    stop=st.sampled_from([(), (0,), (2,)]),
    verify=st.booleans(),
)
def test_a_replay_is_the_decode_while_the_text_stays_greedy(
    prompt, policy, extra, max_new_tokens, stop, verify
):
    table = record_proposals(
        ToyBackend(vocab_size=VOCAB), prompt, mask_token_id=MASK,
        k=policy.num_positions + extra, max_new_tokens=max_new_tokens, stop_token_ids=stop,
    )  # fmt: skip
    assert table.reference.tolist() == toy_greedy(prompt, max_new_tokens, frozenset(stop), VOCAB)
    replayed = replay(table, policy, verify=verify)
    result, widths = _decoded(prompt, policy, verify, max_new_tokens, stop)
    generated = result.tokens[0].tolist()
    greedy = table.reference.tolist()
    if verify:
        assert replayed.exact and generated == greedy
    # Off the greedy path the replay estimates, and says so by the count of tokens off it.
    differ = sum(a != b for a, b in zip(generated, greedy, strict=False))
    differ += abs(len(generated) - len(greedy))
    if replayed.exact and differ == 0:
        assert replayed.decode.tokens[0].tolist() == generated
        assert replayed.passes == result.num_forward_passes
        assert replayed.decode.accepted_histogram.tolist() == result.accepted_histogram.tolist()
        assert replayed.widths.tolist() == widths
        assert replayed.new_tokens == len(generated)
    if replayed.exact:
        assert replayed.decode.tokens[0].tolist() == greedy


def test_a_replay_off_the_greedy_path_counts_the_tokens_off_it():
    # StaticK(3) without verification emits its unchecked mask proposals: on the toy model
    # (random proposals over 3 tokens) they leave the greedy text quickly.
    prompt = [1, 2, 0, 1]
    table = record_proposals(
        ToyBackend(vocab_size=VOCAB), prompt, mask_token_id=MASK, k=3, max_new_tokens=30
    )
    replayed = replay(table, StaticK(3))
    differ = int(np.count_nonzero(replayed.decode.tokens[0] != table.reference))
    assert replayed.off_reference == differ > 0 and not replayed.exact
    assert replayed.passes == 10 and replayed.widths.tolist() == [6] + [5] * 9


def test_replay_and_recording_refuse_what_they_cannot_answer():
    table = record_proposals(
        ToyBackend(vocab_size=VOCAB), [1, 2], mask_token_id=MASK, k=2, max_new_tokens=5
    )
    assert table.k == 2 and table.tokens.shape == (5, 2)
    with pytest.raises(ValueError, match="record with a larger k"):
        replay(table, ConfAdapt(0.9, 3))
    with pytest.raises(ValueError, match="empty"):
        record_proposals(ToyBackend(), [], mask_token_id=MASK, k=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        record_proposals(ToyBackend(), [1], mask_token_id=MASK, k=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="column 0 of tokens must be the reference"):
        ProposalTable([1], [2], [[0, 1]], [[0.5, 0.5]], mask_token_id=MASK, max_new_tokens=1)
    with pytest.raises(ValueError, match="confidences must have the shape"):
        ProposalTable([1], [2], [[2, 1]], [[0.5]], mask_token_id=MASK, max_new_tokens=1)
    with pytest.raises(ValueError, match="more than max_new_tokens"):
        ProposalTable([1], [2, 2], [[2], [2]], [[1.0], [1.0]], mask_token_id=MASK, max_new_tokens=1)


def _gated_model() -> MTPModel:
    # Peaked outputs over 12 tokens: the random gate's proposals match now and then.
    model = tiny_llama(12, hidden_size=32, layers=2, dtype=torch.float64, seed=4,
                       initializer_range=0.5).eval()  # fmt: skip
    model.generation_config.eos_token_id = None
    mtp = MTPModel(model)
    add_mask_gate(model, mtp.mask_token_id, rank=4)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "mask_embedding" in name:
                parameter.copy_(torch.randn_like(parameter))
    return MTPModel(model)


@pytest.mark.parametrize("policy", [StaticK(2), StaticK(3), StaticK(4), ConfAdapt(0.5, 4)], ids=str)
def test_a_replayed_verification_on_a_gated_model_is_its_generate(policy):
    mtp = _gated_model()
    prompt = [3, 1, 5, 9, 2, 5]
    table = record_proposals(
        mtp.decoding_backend(), prompt, mask_token_id=mtp.mask_token_id, k=4, max_new_tokens=24
    )
    out = mtp.generate(torch.tensor([prompt]), policy=policy, verify=True, max_new_tokens=24)
    generated = out.sequences[0, len(prompt) :].tolist()
    replayed = replay(table, policy, verify=True)
    assert generated == table.reference.tolist() == replayed.decode.tokens[0].tolist()
    if replayed.exact:
        assert replayed.passes == out.num_forward_passes
    if policy == StaticK(2):  # some drafts are kept, and every read was recorded
        assert replayed.exact and replayed.passes < 24
