"""mtp_torch.text: the one home of prompt encoding, stop ids and cutting at a stop token."""

from __future__ import annotations

import types

import pytest
import torch

from mtp_torch.text import as_token_ids, cut_at_stop, stop_token_ids


def test_cut_at_stop_keeps_the_first_stop_token_and_nothing_after() -> None:
    assert cut_at_stop([5, 6, 2, 7, 2], [2]) == [5, 6, 2]
    assert cut_at_stop([5, 6, 7], [2, 9]) == [5, 6, 7]
    assert cut_at_stop([], [2]) == []


def test_stop_ids_prefer_the_callers_then_generation_config_then_tokenizer() -> None:
    model = types.SimpleNamespace(
        generation_config=types.SimpleNamespace(eos_token_id=[3, 4]),
        config=types.SimpleNamespace(eos_token_id=5),
    )
    tokenizer = types.SimpleNamespace(eos_token_id=6)
    assert stop_token_ids(7, model, tokenizer) == [7]
    assert stop_token_ids(None, model, tokenizer) == [3, 4]
    model.generation_config.eos_token_id = None
    # Like transformers' generate: config.eos_token_id is not a fallback.
    assert stop_token_ids(None, model) == []
    assert stop_token_ids(None, model, tokenizer) == [6]


@pytest.mark.parametrize("bad", ["<eos>", True, [1, "2"], 2.0])
def test_token_id_lists_refuse_strings_and_floats(bad: object) -> None:
    with pytest.raises(TypeError, match="convert_tokens_to_ids"):
        as_token_ids(bad)  # type: ignore[arg-type]


def test_token_ids_come_from_tensors_and_numpy_ints() -> None:
    assert as_token_ids(torch.tensor([[1], [2]])) == [1, 2]
    assert as_token_ids(None) == []


def test_a_chat_template_that_never_ends_is_stopped_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from mtp_torch import text
    from tests.synthetic import make_tokenizer

    tokenizer = make_tokenizer()
    assert text.encode_prompt(tokenizer, "hi")  # a normal template renders
    tokenizer.chat_template = (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
        "{% endfor %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
    )
    monkeypatch.setattr(text, "CHAT_TEMPLATE_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"chat template took more than 0.5 s to render"):
        text.encode_prompt(tokenizer, "hi")
    assert time.monotonic() - start < 5
