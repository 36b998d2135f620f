"""Training corpora (mtp_torch.training.data, .corpus): file formats, the token stream, the self-written corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtp_torch._resources import package_data
from mtp_torch.training import corpus as _data
from mtp_torch.training.corpus import read_seed_prompts, user_prefix, write_corpus
from mtp_torch.training.data import TokenStream, encode_row, load_corpus
from tests.synthetic import make_tokenizer, tiny_llama

# The GSM8K train sample bundled with the package (mtp convert's default seed prompts).
GSM8K_TRAIN = package_data("gsm8k_train_sample.jsonl")


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- file formats --------------------------------------------------------------------------------


def test_text_rows_get_a_final_eos(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    corpus = load_corpus(write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world"}]), tokenizer)
    assert corpus == [[tokenizer.convert_tokens_to_ids(t) for t in ("hello", "world", "<eos>")]]


def test_chat_rows_use_the_chat_template(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    messages = [
        {"role": "user", "content": "what is two"},
        {"role": "assistant", "content": "five"},
    ]
    corpus = load_corpus(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tokenizer)
    expected = "<|user|> what is two <eos> <|assistant|> five <eos>".split()
    assert corpus == [tokenizer.convert_tokens_to_ids(expected)]


def test_question_answer_rows_become_a_chat_or_plain_text(tmp_path: Path) -> None:
    row = {"question": "what is two plus three", "answer": "five"}
    path = write_jsonl(tmp_path / "gsm.jsonl", [row, row])
    chat = load_corpus(path, make_tokenizer(chat=True))
    assert len(chat) == 2 and chat[0] == chat[1]
    assert chat[0][0] == make_tokenizer().convert_tokens_to_ids("<|user|>")
    plain_tokenizer = make_tokenizer(chat=False)
    plain = load_corpus(path, plain_tokenizer)
    assert plain_tokenizer.decode(plain[0]).startswith(
        "<unk> what is two plus three"
    )  # "Question:"
    assert plain[0][-1] == plain_tokenizer.eos_token_id


def test_plain_text_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_text("a b c\nhello world\n")
    assert len(load_corpus(path, make_tokenizer())[0]) == 6


def test_limit_reads_only_the_first_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    assert len(load_corpus(path, make_tokenizer(), limit=2)) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("\n\n", "empty"),
        ('{"text": "a"}\n{"title": "x"}\n', ':2: .*"text"'),
        ('{"text": "a"}\nnot json\n', ":2 is not valid JSON"),
        ("[1, 2]\n", "JSON object"),
        ('{"messages": "hello"}\n', "messages"),
    ],
)
def test_bad_corpus_files_are_rejected(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_corpus(path, make_tokenizer())


def test_missing_corpus_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "nope.jsonl", make_tokenizer())


def test_chat_rows_need_a_template() -> None:
    with pytest.raises(ValueError, match="chat template"):
        encode_row({"messages": [{"role": "user", "content": "a"}]}, make_tokenizer(chat=False))


# --- seed prompts and the Magpie prefix -------------------------------------------------------------


def test_seed_prompts_are_distinct_and_limited(tmp_path: Path) -> None:
    rows = [
        {"question": "a"},
        {"question": "a"},
        {"question": " "},
        {"question": "b"},
        {"question": "c"},
    ]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    assert read_seed_prompts(path) == ["a", "b", "c"]
    assert read_seed_prompts(path, limit=2) == ["a", "b"]
    with pytest.raises(ValueError, match="no prompt"):
        read_seed_prompts(path, field="missing")


def test_gsm8k_train_questions_can_seed_the_corpus() -> None:
    prompts = read_seed_prompts(GSM8K_TRAIN, limit=5)
    assert len(prompts) == 5 and all(p.strip() for p in prompts)
    assert len(read_seed_prompts(GSM8K_TRAIN)) == 256


def test_user_prefix_is_the_template_before_the_user_text() -> None:
    assert user_prefix(make_tokenizer()) == "<|user|> "
    with pytest.raises(ValueError, match="chat template"):
        user_prefix(make_tokenizer(chat=False))


# --- the self-written corpus --------------------------------------------------------------------------


def test_teacher_writes_a_deduplicated_cached_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = make_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=16).eval()
    cache = tmp_path / "corpus.jsonl"
    seeds = ["what is two", "what is two", "hello world"]
    rows = write_corpus(
        model,
        tokenizer,
        cache,
        5,
        seed_prompts=seeds,
        max_new_tokens=6,
        prompt_max_new_tokens=5,
        batch_size=2,
        progress=False,
    )
    assert 1 <= len(rows) <= 5
    prompts = [row["messages"][0]["content"] for row in rows]
    assert len(set(prompts)) == len(prompts)
    assert {"what is two", "hello world"} <= set(prompts) or len(rows) < 2
    assert all(
        row["messages"][1]["role"] == "assistant" and row["messages"][1]["content"] for row in rows
    )
    on_disk = [json.loads(line) for line in cache.read_text().splitlines()]
    assert on_disk == rows
    # A second call with what is cached generates nothing.
    monkeypatch.setattr(_data, "_generate_texts", lambda *a, **k: pytest.fail("regenerated"))
    assert write_corpus(model, tokenizer, cache, len(rows), progress=False) == rows
    # The cache is a corpus like any other.
    assert len(load_corpus(cache, tokenizer)) == len(rows)


def test_a_tokenizer_without_a_pad_token_still_writes_batches(tmp_path: Path) -> None:
    # The GGUF load of the default under transformers 5.17 gave a tokenizer with no pad token,
    # and batched generation refused to pad: it pads with EOS then (the mask hides padding).
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    model = tiny_llama(len(tokenizer), hidden_size=16).eval()
    seeds = ["what is two", "hello world a b c"]  # different lengths: padding is needed
    rows = write_corpus(
        model, tokenizer, tmp_path / "c.jsonl", 2, seed_prompts=seeds, max_new_tokens=4,
        batch_size=2, progress=False,
    )  # fmt: skip
    assert {row["messages"][0]["content"] for row in rows} <= set(seeds) and rows
    assert tokenizer.pad_token is None  # left as it was


def test_convert_writes_its_corpus_on_the_training_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A GPU conversion once spent its whole lease writing the corpus with the host's cores: the
    # model moved to the GPU only when training began.
    import argparse

    from mtp_torch.cli import convert

    seen: list[tuple[torch.device, torch.dtype]] = []

    def fake_write(
        writer: torch.nn.Module, tokenizer: object, cache: Path, *a: object, **k: object
    ) -> list[object]:
        parameter = next(writer.parameters())
        seen.append((parameter.device, parameter.dtype))
        turns = [
            {"role": "user", "content": "what is two"},
            {"role": "assistant", "content": "five"},
        ]
        cache.write_text(json.dumps({"messages": turns}) + "\n")
        return []

    monkeypatch.setattr(convert, "write_corpus", fake_write)
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    tokenizer = make_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=16)
    meta = torch.device("meta")  # stands for the GPU: where training will run
    args = parser.parse_args(
        ["--corpus-cache", str(tmp_path / "c.jsonl"), "--corpus-dtype", "bfloat16"]
    )
    assert len(convert._corpus(args, model, tokenizer, "tiny", 0, meta)) == 1
    assert seen == [(meta, torch.bfloat16)]
    # The model that trains is neither cast nor moved by the bfloat16 copy that wrote.
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    args = parser.parse_args(
        ["--corpus-cache", str(tmp_path / "d.jsonl"), "--corpus-dtype", "auto"]
    )
    convert._corpus(args, model, tokenizer, "tiny", 0, meta)
    assert seen[-1] == (meta, torch.float32)


def test_magpie_prompts_start_from_the_user_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tokenizer = make_tokenizer()
    calls: list[list[str]] = []

    def fake_generate(
        model: object, tok: object, prompts: list[str], **kwargs: object
    ) -> list[str]:
        calls.append(list(prompts))
        return [f"a b {len(calls)} {i}" for i in range(len(prompts))]

    def fake_generate_ids(
        model: object, tok: object, prompts: list[str], **kwargs: object
    ) -> list[tuple[list[int], list[int], list[float]]]:
        calls.append(list(prompts))
        return [([1, 2], [3, 4], [0.9, 0.5]) for _ in prompts]

    monkeypatch.setattr(_data, "_generate_texts", fake_generate)
    monkeypatch.setattr(_data, "_generate_ids", fake_generate_ids)
    rows = write_corpus(
        tiny_llama(len(tokenizer), hidden_size=16),
        tokenizer,
        tmp_path / "c.jsonl",
        3,
        batch_size=4,
        progress=False,
    )
    assert len(rows) == 3 and {r["source"] for r in rows} == {"magpie"}
    assert calls[0] == ["<|user|> "] * 3  # Magpie: continue the user prefix
    assert calls[1][0].startswith("<|user|> a b 1 0 <eos> <|assistant|>")  # then answer it
    # Greedy responses keep the teacher's exact token ids; the prompt is context only.
    assert rows[0]["ids"] == [1, 2, 3, 4] and rows[0]["prompt_len"] == 2
    assert rows[0]["confidence"] == [0.9, 0.5]


def test_corpus_without_prompt_source_is_rejected(tmp_path: Path) -> None:
    tokenizer = make_tokenizer(chat=False)
    with pytest.raises(ValueError, match="chat template"):
        write_corpus(tiny_llama(len(tokenizer), hidden_size=16), tokenizer, tmp_path / "c.jsonl", 2)


# --- the token stream -------------------------------------------------------------------------------


def test_stream_concatenates_and_cuts_consecutive_windows() -> None:
    stream = TokenStream.from_sequences([[1, 2, 3], [4, 5], [], [6, 7, 8, 9]], seed=0)
    assert sorted(stream.tokens.tolist()) == list(range(1, 10))
    first = stream.take(2, 4)
    assert first.shape == (2, 4)
    assert first.reshape(-1).tolist() == stream.tokens[:8].tolist()
    wrapped = stream.take(1, 4)  # one token left: wraps to the start
    assert wrapped[0].tolist() == stream.tokens[:4].tolist() and stream.epoch == 1


@given(
    lengths=st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=8),
    window=st.integers(min_value=1, max_value=10),
    takes=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=6),
)
def test_stream_state_round_trips(lengths: list[int], window: int, takes: list[int]) -> None:
    sequences = [list(range(n)) for n in lengths]
    if sum(lengths) < window:
        with pytest.raises(ValueError):
            TokenStream.from_sequences(sequences).take(1, window)
        return
    stream = TokenStream.from_sequences(sequences, seed=3)
    twin = TokenStream.from_sequences(sequences, seed=3)
    for count in takes:
        stream.take(count, window)
    twin.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    np.testing.assert_array_equal(stream.take(3, window), twin.take(3, window))


@pytest.mark.parametrize("sequences", [[], [[]], [[], []]])
def test_empty_stream_is_rejected(sequences: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="empty"):
        TokenStream.from_sequences(sequences)


def test_stream_rejects_bad_tokens_and_other_corpora() -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        TokenStream.from_sequences([[1, -2, 3]])
    with pytest.raises(ValueError, match="non-negative integer"):
        TokenStream.from_sequences([[1.5, 2.0]])  # type: ignore[list-item]
    stream = TokenStream.from_sequences([[1, 2, 3]])
    with pytest.raises(ValueError, match="same corpus"):
        stream.load_state_dict({"cursor": 0, "epoch": 0, "num_tokens": 7})
    with pytest.raises(ValueError, match="window needs 4"):
        stream.take(1, 4)


def test_stream_windows_are_int64_token_ids() -> None:
    windows = TokenStream.from_sequences([torch.arange(10).tolist()]).take(2, 5)
    assert windows.dtype == np.int64
