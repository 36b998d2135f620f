"""``MTPModel.generate`` with transformers' generation arguments equals ``hf_model.generate``.

``generation_config=``, ``stopping_criteria=``, ``stop_strings=`` and ``streamer=`` keep their
transformers meaning: with ``StaticK(1)`` and with ``verify=True`` the tokens equal transformers'
greedy search given the same arguments, and a row stops at the same token even when one MTP
step emits several.  The model is a tiny random float64 Llama (no argmax ties) and the
tokenizer a byte-level BPE trained on three sentences (``tests/synthetic.py``), so nothing
touches the network.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

from mtp_core import ConfAdapt, StaticK
from mtp_torch import MTPModel
from tests.synthetic import bpe_tokenizer, tiny_llama

PAD, EOS = 0, 2
# (policy, verify) pairs that must reproduce greedy search exactly.
EXACT = [(StaticK(1), False), (StaticK(1), True), (ConfAdapt(0.5, 4), True), (StaticK(3), True)]
EXACT_IDS = ["static1", "static1-verify", "confadapt-verify", "static3-verify"]


@pytest.fixture(scope="module")
def mtp() -> MTPModel:
    tokenizer = bpe_tokenizer()
    model = tiny_llama(len(tokenizer), dtype=torch.float64, seed=0).eval()
    model.config.eos_token_id = None  # each test says how rows stop
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return MTPModel(model, tokenizer=tokenizer)


def encode(mtp: MTPModel, *texts: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask of ``texts``."""
    mtp.tokenizer.padding_side = "left"
    batch = mtp.tokenizer(list(texts), return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def hf_greedy(mtp: MTPModel, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    kwargs.setdefault("pad_token_id", PAD)
    with torch.no_grad():
        out: torch.Tensor = mtp.model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    return out


def assert_same(expected: torch.Tensor, got: torch.Tensor) -> None:
    # transformers pads to the longest row; so does MTPModel (both with pad_token_id).
    assert got.tolist() == expected.tolist()


def free_run(mtp: MTPModel, ids: torch.Tensor, mask: torch.Tensor, n: int = 24) -> list[int]:
    """Row 0's greedy continuation with no stop at all."""
    out = hf_greedy(mtp, ids, mask, max_new_tokens=n)
    return out[0, ids.shape[1] :].tolist()


# --- generation_config ---------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "verify"), EXACT, ids=EXACT_IDS)
def test_generation_config_equals_transformers(mtp: MTPModel, policy, verify) -> None:
    ids, mask = encode(mtp, "the quick brown", "hello")
    stop = free_run(mtp, ids, mask)[7]  # a token greedy search reaches: EOS matters
    config = GenerationConfig(max_new_tokens=14, eos_token_id=stop, pad_token_id=5)
    expected = hf_greedy(mtp, ids, mask, generation_config=config, pad_token_id=5)
    got = mtp.generate(ids, policy, attention_mask=mask, verify=verify, generation_config=config)
    assert_same(expected, got.sequences)
    assert stop in got.sequences[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize(("policy", "verify"), EXACT, ids=EXACT_IDS)
def test_explicit_arguments_win_over_the_generation_config(mtp: MTPModel, policy, verify) -> None:
    ids, mask = encode(mtp, "two plus", "the lazy dog")
    config = GenerationConfig(max_new_tokens=20, eos_token_id=EOS)
    expected = hf_greedy(mtp, ids, mask, generation_config=config, max_new_tokens=6)
    got = mtp.generate(
        ids, policy, 6, mask, verify=verify, generation_config=config, pad_token_id=PAD
    )
    assert_same(expected, got.sequences)
    # max_length counts the (padded) prompt, as in transformers.
    by_length = GenerationConfig(max_length=ids.shape[1] + 9)
    expected = hf_greedy(mtp, ids, mask, generation_config=by_length)
    got = mtp.generate(ids, policy, attention_mask=mask, verify=verify, generation_config=by_length)
    assert_same(expected, got.sequences)
    assert got.sequences.shape[1] == ids.shape[1] + 9


def test_generation_config_sampling_follows_do_sample(mtp: MTPModel) -> None:
    ids, mask = encode(mtp, "hello world")
    sample = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0)
    first = mtp.generate(ids, StaticK(2), attention_mask=mask, generation_config=sample, seed=3)
    again = mtp.generate(ids, StaticK(2), attention_mask=mask, generation_config=sample, seed=3)
    assert torch.equal(first.sequences, again.sequences)
    # An explicit temperature of 0 wins over do_sample: greedy search again.
    greedy = mtp.generate(
        ids, StaticK(1), attention_mask=mask, generation_config=sample, temperature=0.0
    )
    assert_same(hf_greedy(mtp, ids, mask, max_new_tokens=12), greedy.sequences)
    with pytest.raises(ValueError, match="verify"):
        mtp.generate(ids, attention_mask=mask, generation_config=sample, verify=True)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (GenerationConfig(num_beams=2), ValueError, "num_beams"),
        (GenerationConfig(repetition_penalty=1.3), ValueError, "repetition_penalty"),
        (GenerationConfig(max_length=2), ValueError, "max_length"),
        ({"max_new_tokens": 4}, TypeError, "GenerationConfig"),
    ],
)
def test_unsupported_generation_configs_are_refused(
    mtp: MTPModel, config: Any, error: type[Exception], match: str
) -> None:
    ids, mask = encode(mtp, "hello world")
    with pytest.raises(error, match=match):
        mtp.generate(ids, attention_mask=mask, generation_config=config)


def test_a_bad_pad_id_is_named(mtp: MTPModel) -> None:
    ids, mask = encode(mtp, "hello world")
    with pytest.raises(TypeError, match="pad_token_id"):
        mtp.generate(ids, attention_mask=mask, pad_token_id="<pad>")  # type: ignore[arg-type]


# --- stopping criteria ---------------------------------------------------------------------------


class StopAtLength(StoppingCriteria):
    """Stops every row once the sequence (padded prompt included) reaches ``length``."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length)


class StopAfterToken(StoppingCriteria):
    """Stops a row whose last token is ``token`` (per-row answers)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize(("policy", "verify"), EXACT, ids=EXACT_IDS)
def test_stopping_criteria_equal_transformers(mtp: MTPModel, policy, verify) -> None:
    # transformers pads the rows that stopped early only when an EOS id is set (it keeps
    # decoding them otherwise); MTPModel always finishes them like EOS.  So an EOS is given.
    ids, mask = encode(mtp, "the quick brown", "hello", "five")
    length = StoppingCriteriaList([StopAtLength(ids.shape[1] + 5)])
    expected = hf_greedy(mtp, ids, mask, max_new_tokens=20, stopping_criteria=length)
    got = mtp.generate(ids, policy, 20, mask, verify=verify, stopping_criteria=length)
    assert_same(expected, got.sequences)
    assert got.sequences.shape[1] == ids.shape[1] + 5
    token = free_run(mtp, ids, mask)[4]
    per_row = [StopAfterToken(token)]  # a plain list works too
    expected = hf_greedy(
        mtp, ids, mask, max_new_tokens=20, stopping_criteria=per_row, eos_token_id=EOS
    )
    got = mtp.generate(ids, policy, 20, mask, EOS, verify=verify, stopping_criteria=per_row)
    assert_same(expected, got.sequences)
    assert got.num_new_tokens[0] == 5 and got.num_new_tokens.max() > 5


def test_a_multi_token_step_is_cut_at_the_stopping_token(mtp: MTPModel) -> None:
    """Static k = 3 emits 3 tokens per pass; the criterion still stops at its exact token."""
    ids, mask = encode(mtp, "the quick brown")
    free = mtp.generate(ids, StaticK(3), 18, mask).sequences[0, ids.shape[1] :].tolist()
    for stop_after in (1, 4, 8):
        criteria = [StopAtLength(ids.shape[1] + stop_after)]
        out = mtp.generate(ids, StaticK(3), 18, mask, stopping_criteria=criteria)
        assert out.sequences[0, ids.shape[1] :].tolist() == free[:stop_after]
        assert out.accepted_histogram[(stop_after - 1) % 3 + 1] >= 1


def test_verified_steps_of_several_tokens_stop_where_greedy_stops(mtp: MTPModel) -> None:
    """A biased model makes the drafts match, so verified steps emit several tokens."""
    favourite = 40

    def bias(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., favourite] += 3.0
        return output

    handle = mtp.model.lm_head.register_forward_hook(bias)
    try:
        ids, mask = encode(mtp, "hello there", "the quick brown fox")
        free = mtp.generate(ids, ConfAdapt(0.01, 4), 24, mask, verify=True)
        assert free.accepted_histogram[2:].sum() > 0, "no multi-token step to cut"
        for length in range(ids.shape[1] + 1, ids.shape[1] + 12):
            criteria = [StopAtLength(length)]
            expected = hf_greedy(mtp, ids, mask, max_new_tokens=24, stopping_criteria=criteria)
            got = mtp.generate(
                ids, ConfAdapt(0.01, 4), 24, mask, verify=True, stopping_criteria=criteria
            )
            assert_same(expected, got.sequences)
    finally:
        handle.remove()


class StopRowAt(StoppingCriteria):
    """Stops the row whose (padded) prompt is ``prompt`` after ``new`` generated tokens."""

    def __init__(self, prompt: torch.Tensor, new: int):
        self.prompt, self.new = prompt, new

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        width = self.prompt.shape[0]
        mine = torch.equal(input_ids[0, :width], self.prompt)
        return torch.tensor([mine and input_ids.shape[1] - width >= self.new])


def test_each_row_reports_its_passes_and_why_it_stopped(mtp: MTPModel) -> None:
    """One batch: a row ends on an EOS, one by a stopping criterion inside a step, one at its
    budget; the output says which, and how many passes each row took part in."""
    ids, mask = encode(mtp, "hello world", "two plus", "the lazy dog")
    free = mtp.generate(ids, StaticK(3), 10, mask)
    rows = [free.sequences[row, ids.shape[1] :].tolist() for row in range(3)]
    # An EOS that row 0 alone emits, at its 4th token (in its second step of 3 tokens).
    eos = rows[0][3]
    assert eos not in rows[0][:3] and eos not in rows[1] + rows[2]
    criteria = [StopRowAt(ids[1], 7)]
    out = mtp.generate(ids, StaticK(3), 10, mask, eos, stopping_criteria=criteria)
    assert out.stop_reasons == ("stop_token", "stop_criterion", "max_new_tokens")
    assert out.num_new_tokens.tolist() == [4, 7, 10]
    for row, length in enumerate((4, 7, 10)):
        new = out.sequences[row, ids.shape[1] : ids.shape[1] + length].tolist()
        assert new == rows[row][:length]
    # Three tokens a pass: 4 tokens take 2 passes, 7 take 3, 10 take 4.
    assert out.forward_passes_per_row.tolist() == [2, 3, 4]
    assert out.num_forward_passes == 4
    assert free.forward_passes_per_row.tolist() == [4, 4, 4]
    assert free.stop_reasons == ("max_new_tokens",) * 3
    # A budget set by a generation config's max_length is named so.
    config = GenerationConfig(max_length=ids.shape[1] + 4)
    by_length = mtp.generate(ids, StaticK(3), attention_mask=mask, generation_config=config)
    assert by_length.stop_reasons == ("max_length",) * 3
    assert by_length.forward_passes_per_row.tolist() == [2, 2, 2]


# --- stop strings --------------------------------------------------------------------------------


def _stop_string(mtp: MTPModel, tokens: list[int], end: int) -> str:
    """A stop string made of the text of ``tokens[end - 2 : end]`` (spans a token boundary)."""
    text = mtp.tokenizer.decode(tokens[end - 2 : end])
    return text[-4:] if len(text) > 4 else text


@pytest.mark.parametrize(("policy", "verify"), EXACT, ids=EXACT_IDS)
def test_stop_strings_equal_transformers(mtp: MTPModel, policy, verify) -> None:
    ids, mask = encode(mtp, "the quick brown")
    free = free_run(mtp, ids, mask)
    stop = _stop_string(mtp, free, 9)
    expected = hf_greedy(
        mtp, ids, mask, max_new_tokens=24, stop_strings=[stop], tokenizer=mtp.tokenizer
    )
    got = mtp.generate(ids, policy, 24, mask, verify=verify, stop_strings=stop)
    assert_same(expected, got.sequences)
    new = got.sequences[0, ids.shape[1] :].tolist()
    assert len(new) < 24
    assert stop in mtp.tokenizer.decode(new)
    assert stop not in mtp.tokenizer.decode(new[:-1])  # the completing token is kept
    # An explicit tokenizer and a generation_config's stop_strings work the same way.
    config = GenerationConfig(max_new_tokens=24, stop_strings=[stop])
    again = mtp.generate(
        ids, policy, None, mask, verify=verify, generation_config=config, tokenizer=mtp.tokenizer
    )
    assert_same(expected, again.sequences)


def test_stop_strings_cut_a_multi_token_step(mtp: MTPModel) -> None:
    ids, mask = encode(mtp, "hello world")
    free = mtp.generate(ids, StaticK(4), 20, mask).sequences[0, ids.shape[1] :].tolist()
    stop = _stop_string(mtp, free, 6)
    out = mtp.generate(ids, StaticK(4), 20, mask, stop_strings=[stop, "never appears ~~"])
    new = out.sequences[0, ids.shape[1] :].tolist()
    assert new == free[: len(new)] and len(new) <= 6
    assert stop in mtp.tokenizer.decode(new) and stop not in mtp.tokenizer.decode(new[:-1])


def test_stop_strings_need_a_tokenizer(mtp: MTPModel) -> None:
    bare = MTPModel(mtp.model, mask_token_id=mtp.mask_token_id)
    ids, mask = encode(mtp, "hello")
    with pytest.raises(ValueError, match="tokenizer"):
        bare.generate(ids, attention_mask=mask, stop_strings=["x"])
    with pytest.raises(TypeError, match="stop_strings"):
        mtp.generate(ids, attention_mask=mask, stop_strings=[3])


# --- streamers -----------------------------------------------------------------------------------


class Recorder:
    """A streamer that records what it is given."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended += 1


def test_streamer_gets_the_prompt_then_each_steps_tokens(mtp: MTPModel) -> None:
    ids, mask = encode(mtp, "two plus three")
    recorder = Recorder()
    out = mtp.generate(ids, StaticK(3), 10, mask, streamer=recorder)
    assert recorder.ended == 1
    assert recorder.puts[0].tolist() == ids.tolist()
    chunks = [chunk.tolist() for chunk in recorder.puts[1:]]
    assert [len(chunk) for chunk in chunks] == [3, 3, 3, 1]
    assert sum(chunks, []) == out.sequences[0, ids.shape[1] :].tolist()


def _iterate_in_thread(
    streamer: TextIteratorStreamer, generate: Any, **kwargs: Any
) -> tuple[str, Any]:
    """Run ``generate(streamer=streamer, **kwargs)`` in a thread and read the streamer here."""
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(out=generate(streamer=streamer, **kwargs))
    )
    thread.start()
    pieces: Iterator[str] = iter(streamer)
    text = "".join(pieces)
    thread.join()
    return text, result["out"]


@pytest.mark.parametrize("policy", [StaticK(1), StaticK(3), ConfAdapt(0.3, 4)])
def test_text_iterator_streamer_yields_the_returned_text(mtp: MTPModel, policy) -> None:
    ids, mask = encode(mtp, "the quick brown")
    tokenizer = mtp.tokenizer
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    text, out = _iterate_in_thread(
        streamer, mtp.generate, input_ids=ids, attention_mask=mask, policy=policy, max_new_tokens=16
    )
    assert text == tokenizer.decode(out.sequences[0, ids.shape[1] :])
    if policy == StaticK(1):
        hf_streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
        hf_text, _ = _iterate_in_thread(
            hf_streamer,
            mtp.model.generate,
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=16,
        )
        assert text == hf_text


def test_text_streamer_prints_what_transformers_prints(
    mtp: MTPModel, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, mask = encode(mtp, "hello world")
    mtp.generate(ids, StaticK(1), 12, mask, streamer=TextStreamer(mtp.tokenizer))
    ours = capsys.readouterr().out
    hf_greedy(mtp, ids, mask, max_new_tokens=12, streamer=TextStreamer(mtp.tokenizer))
    assert ours == capsys.readouterr().out
    assert ours.startswith("hello world") and ours.endswith("\n")


def test_streamer_needs_one_prompt_and_is_ended_on_error(mtp: MTPModel) -> None:
    ids, mask = encode(mtp, "hello", "two plus")
    with pytest.raises(ValueError, match="batch size 1"):
        mtp.generate(ids, attention_mask=mask, streamer=Recorder())

    class Broken(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            raise RuntimeError("criterion failed")

    recorder = Recorder()
    with pytest.raises(RuntimeError, match="criterion failed"):
        mtp.generate(
            ids[:1], attention_mask=mask[:1], streamer=recorder, stopping_criteria=[Broken()]
        )
    assert recorder.ended == 1


def test_no_new_arguments_change_nothing(mtp: MTPModel) -> None:
    """Without the transformers arguments the output is what it always was."""
    ids, mask = encode(mtp, "the quick brown", "hello")
    for policy in (StaticK(2), ConfAdapt(0.3, 4)):
        plain = mtp.generate(ids, policy, 12, mask)
        empty = mtp.generate(
            ids, policy, 12, mask, stopping_criteria=[], stop_strings=[], streamer=None
        )
        assert torch.equal(plain.sequences, empty.sequences)
        assert plain.num_forward_passes == empty.num_forward_passes
        assert np.array_equal(plain.accepted_histogram, empty.accepted_histogram)
