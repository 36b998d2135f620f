"""``decode_until``: decoding that ends each row at a stop string, a stop token or its budget.

A row ends at the first token after which its generated text contains a stop string, and the
check reads only a bounded tail of the row: the tail's verdict equals the whole text's, token by
token, for any tokens and stop strings (property tests on a byte-level BPE and a word-level
tokenizer).  On a tiny model a stop string that spans the boundary between two MTP steps ends
its row in the same step as the whole-text check of every step did before, and the tally
comes from ``generate``'s per-row counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp_core import StaticK
from mtp_torch import MTPModel
from mtp_torch.integrations.stopping import DecodeSettings, _StopStrings, decode_until
from tests.synthetic import bpe_tokenizer, make_tokenizer, tiny_llama

BPE = bpe_tokenizer()
WORD = make_tokenizer(chat=False)


def _first_stop_whole(tokenizer: Any, tokens: list[int], stops: list[str]) -> int | None:
    """The old check: decode the whole row after each token; the first length that holds."""
    for end in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:end], skip_special_tokens=False)
        if any(stop in text for stop in stops):
            return end
    return None


def _first_stop_tail(tokenizer: Any, tokens: list[int], stops: list[str]) -> int | None:
    """The criterion as the engine asks it: after each token, on the row so far."""
    check = _StopStrings(tokenizer, stops, prompt_width=0)
    for end in range(1, len(tokens) + 1):
        if check.met(tokens[:end]):
            return end
    return None


@st.composite
def tokens_and_stops(draw: st.DrawFn, tokenizer: Any) -> tuple[list[int], list[str]]:
    """Token ids (long rows, so the tail is a small part) and stop strings, most of them cut
    from the row's own text so that they occur."""
    tokens = draw(st.lists(st.integers(0, len(tokenizer) - 1), min_size=1, max_size=80))
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    stops = []
    for _ in range(draw(st.integers(1, 3))):
        if text and draw(st.booleans()):
            start = draw(st.integers(0, len(text) - 1))
            stops.append(text[start : start + draw(st.integers(1, 12))])
        else:
            stops.append(draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz .,!?", min_size=1)))
    return tokens, stops


@settings(max_examples=150, deadline=None)
@given(
    case=st.sampled_from([BPE, WORD]).flatmap(
        lambda tokenizer: tokens_and_stops(tokenizer).map(lambda case: (tokenizer, case))
    )
)
def test_the_tail_check_stops_where_the_whole_text_check_stops(case) -> None:
    tokenizer, (tokens, stops) = case
    assert _first_stop_tail(tokenizer, tokens, stops) == _first_stop_whole(tokenizer, tokens, stops)


def test_the_tail_widens_to_a_stop_string_spelled_in_many_tokens() -> None:
    """A stop string its own encoding spells in 2 tokens, emitted one character a token: the
    tail widens (by characters, not tokens) until it holds the whole string."""
    stop = " quick brown"
    check = _StopStrings(BPE, [stop], prompt_width=0)
    spelled = [BPE.encode(char, add_special_tokens=False)[0] for char in stop]
    assert check.window < len(spelled)  # the first tail is too short: it must widen
    prefix = "two plus three is five! hello world, hello there? the lazy dog."
    row = BPE.encode(prefix, add_special_tokens=False) + spelled
    assert _first_stop_tail(BPE, row, [stop]) == len(row) == _first_stop_whole(BPE, row, [stop])
    assert stop in check.tail_text(row) and len(check.tail_text(row)) < len(BPE.decode(row))


@pytest.fixture(scope="module")
def mtp() -> MTPModel:
    model = tiny_llama(len(BPE), dtype=torch.float64, seed=0).eval()
    model.config.eos_token_id = None  # each test says how rows stop
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return MTPModel(model, tokenizer=BPE)


PROMPTS = ["hello world", "two plus", "the lazy dog"]


def _old_decode_until(mtp: MTPModel, prompts: list[list[int]], stops: list[str], budget: int):
    """What ``decode_until`` returned before: each row's tokens up to the end of the step after
    which its whole text held a stop string, and the steps until then."""
    chunks: dict[int, list[list[int]]] = {row: [] for row in range(len(prompts))}
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = mtp.model.generation_config.eos_token_id
    mtp.generate(ids, StaticK(3), budget, mask, on_chunk=lambda r, t: chunks[r].append(t.tolist()))
    rows, passes = [], []
    for row in range(len(prompts)):
        tokens: list[int] = []
        steps = 0
        for chunk in chunks[row]:
            tokens, steps = tokens + chunk, steps + 1
            text = BPE.decode(tokens, skip_special_tokens=False)
            if chunk[-1] == eos or len(tokens) >= budget or any(s in text for s in stops):
                break
        rows.append(tokens)
        passes.append(steps)
    return rows, passes


def test_rows_end_at_a_stop_string_across_steps_an_eos_or_the_budget(mtp: MTPModel) -> None:
    prompts = [BPE.encode(text) for text in PROMPTS]
    settings = DecodeSettings(policy=StaticK(3), max_new_tokens=15)
    free, _ = decode_until(mtp, prompts, [], settings)
    # Row 0's text is " five" "ld" "ld" | "i" ...: "ldi" spans its first two steps of 3 tokens.
    stop = "ldi"
    assert stop not in BPE.decode(free[0][:3]) and stop in BPE.decode(free[0][:4])
    # Row 1 emits token 28 at its 10th token (its 4th step); no other row emits it.
    eos = 28
    assert free[1].index(eos) == 9 and eos not in free[0] + free[2]
    assert all(stop not in BPE.decode(row) for row in free[1:])
    mtp.model.generation_config.eos_token_id = eos
    try:
        rows, stats = decode_until(mtp, prompts, [stop, "never ~ there"], settings)
        old_rows, old_passes = _old_decode_until(mtp, prompts, [stop], 15)
    finally:
        mtp.model.generation_config.eos_token_id = None
    assert rows == [free[0][:4], free[1][:10], free[2]]
    # The same step as before ends each row; a stop string's row now ends at the token that
    # completed it (before, the step's later tokens came too), and its text cut at the stop
    # string is the same.
    assert old_passes == [2, 4, 5]
    assert [len(row) for row in old_rows] == [6, 10, 15]
    for new, old in zip(rows, old_rows, strict=True):
        assert old[: len(new)] == new
        assert BPE.decode(new).split(stop)[0] == BPE.decode(old).split(stop)[0]
    # The tally: passes per row 2, 4, 5 (three tokens a step), the batch's 5.
    assert stats.num_requests == 3 and stats.num_forward_passes == 5
    assert stats.num_request_passes == 11 and stats.num_generated_tokens == 4 + 10 + 15
    assert stats.tokens_per_forward == pytest.approx(np.mean([4 / 2, 10 / 4, 15 / 5]))


def test_a_zero_budget_and_the_tokenizer_check(mtp: MTPModel) -> None:
    prompts = [BPE.encode(text) for text in PROMPTS]
    rows, stats = decode_until(mtp, prompts, ["x"], DecodeSettings(StaticK(2), 0))
    assert rows == [[], [], []] and stats.num_forward_passes == 0 == stats.tokens_per_forward
    bare = MTPModel(mtp.model, mask_token_id=mtp.mask_token_id)
    with pytest.raises(ValueError, match="tokenizer"):
        decode_until(bare, prompts, ["x"], DecodeSettings(StaticK(2), 4))
    assert decode_until(bare, prompts, ["", ""], DecodeSettings(StaticK(2), 4))[0] == [
        row[:4] for row in decode_until(mtp, prompts, [], DecodeSettings(StaticK(2), 4))[0]
    ]
