"""``mtp generate`` on a tiny saved checkpoint with an offline character-level tokenizer."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mtp_core import ConfAdapt, StaticK
from mtp_torch import MTPModel
from mtp_torch.cli import SUBCOMMANDS, build_parser, main, parse_policy
from tests.synthetic import tiny_llama

CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<pad>", "<eos>", "<user>", "<assistant>"]
    vocab = {token: i for i, token in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz "))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<user>", "<assistant>"]}, replace_extra_special_tokens=False
    )
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a chat-template tokenizer, saved as an MTP checkpoint."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_llama(
        len(tokenizer),
        hidden_size=32,
        max_positions=128,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=2,
        initializer_range=1.0,
    ).eval()
    mtp = MTPModel(model, tokenizer=tokenizer)
    return mtp.save_pretrained(tmp_path_factory.mktemp("cli") / "tiny-mtp", k_max=4, threshold=0.6)


def run_json(capsys: pytest.CaptureFixture[str], *arguments: str) -> dict[str, object]:
    status = main(["generate", "--json", "--device", "cpu", *arguments])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    record: dict[str, object] = json.loads(captured.out)
    return record


def test_generate_json(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = run_json(
        capsys,
        "--model",
        str(checkpoint),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "12",
        "--policy",
        "static:3",
    )
    assert set(record) >= {
        "text",
        "tokens",
        "token_ids",
        "tokens_per_forward",
        "num_forward_passes",
        "seconds",
        "tokens_per_second",
    }
    tokens = record["tokens"]
    assert isinstance(tokens, int) and 1 <= tokens <= 12
    assert isinstance(record["token_ids"], list) and len(record["token_ids"]) == tokens
    assert isinstance(record["text"], str)
    assert record["num_forward_passes"] == -(-tokens // 3)  # static:3 emits 3 per pass
    assert float(record["tokens_per_forward"]) > 1.0 or tokens == 1  # type: ignore[arg-type]
    assert float(record["seconds"]) > 0  # type: ignore[arg-type]


def test_generate_skinny_kernel_gives_the_stock_tokens(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "10"]
    common += ["--policy", "confadapt:0.3:3"]
    stock = run_json(capsys, *common, "--kernel", "stock")  # the CLI's default, auto, is timed
    skinny = run_json(capsys, *common, "--kernel", "skinny")
    assert skinny["token_ids"] == stock["token_ids"]
    with pytest.raises(SystemExit) as exited:
        main(["generate", *common, "--kernel", "fast"])
    assert exited.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_generate_matches_the_python_api(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI applies the chat template unless told not to, and decodes like MTPModel."""
    mtp = MTPModel.from_pretrained(checkpoint)
    assert mtp.tokenizer is not None
    for chat, flags in ((True, ()), (False, ("--no-chat-template",))):
        record = run_json(
            capsys,
            "--model",
            str(checkpoint),
            "--prompt",
            "abc",
            "--max-new-tokens",
            "10",
            "--verify",
            "--kernel",
            "stock",  # MTPModel's default; the CLI's, auto, picks kernels by timing
            *flags,
        )
        if chat:
            text = mtp.tokenizer.apply_chat_template(
                [{"role": "user", "content": "abc"}], tokenize=False, add_generation_prompt=True
            )
            assert text == "<user>abc<assistant>"
            ids = torch.tensor([mtp.tokenizer(text, add_special_tokens=False)["input_ids"]])
        else:
            ids = torch.tensor([mtp.tokenizer("abc")["input_ids"]])
        expected = mtp.generate(ids, policy=StaticK(1), max_new_tokens=10)
        count = int(expected.num_new_tokens[0])
        assert (
            record["token_ids"]
            == expected.sequences[0, ids.shape[1] : ids.shape[1] + count].tolist()
        )
        # The stored default policy (ConfAdapt(0.6, 4)) is used when --policy is absent.
        assert record["policy"] == repr(ConfAdapt(threshold=0.6, k_max=4))


def test_generate_text_mode_streams(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            "generate",
            "--model",
            str(checkpoint),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0
    assert "tokens per forward pass" in captured.err
    assert captured.out.endswith("\n")


def test_text_mode_streams_exactly_the_generated_text(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text mode streams through transformers' TextStreamer: the same text as --json, then a
    newline."""
    arguments = ["--model", str(checkpoint), "--prompt", "abc", "--max-new-tokens", "9"]
    arguments += ["--policy", "static:3", "--device", "cpu"]
    record = run_json(capsys, *arguments)
    assert main(["generate", *arguments]) == 0
    assert capsys.readouterr().out == f"{record['text']}\n"


def test_bad_policy_is_a_clean_error(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--policy", "fast"])
    assert status == 2
    assert "confadapt" in capsys.readouterr().err


def test_only_installed_subcommands_are_registered() -> None:
    parser = build_parser()
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    choices = set(subcommands[0].choices)
    installed = {name for name in SUBCOMMANDS if importlib.util.find_spec(f"mtp_torch.cli.{name}")}
    assert "generate" in choices
    assert choices == installed


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        ("confadapt", ConfAdapt()),
        ("confadapt:0.9", ConfAdapt(threshold=0.9)),
        ("confadapt:0.75:8", ConfAdapt(threshold=0.75, k_max=8)),
        ("ConfAdapt:1", ConfAdapt(threshold=1.0)),
        ("static:3", StaticK(3)),
        ("static:1", StaticK(1)),
    ],
)
def test_parse_policy(spec: str, policy: object) -> None:
    assert parse_policy(spec) == policy


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "static",
        "static:",
        "static:0",
        "static:2.5",
        "static:3:4",
        "confadapt:0",
        "confadapt:1.2",
        "confadapt:x",
        "confadapt:0.9:0",
        "confadapt:0.9:8:1",
        "greedy",
        "topk:3",
    ],
)
def test_parse_policy_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="policy"):
        parse_policy(spec)


@given(threshold=st.floats(1e-6, 1.0), k_max=st.integers(1, 64), k=st.integers(1, 64))
def test_parse_policy_round_trips(threshold: float, k_max: int, k: int) -> None:
    assert parse_policy(f"confadapt:{threshold!r}:{k_max}") == ConfAdapt(threshold, k_max)
    assert parse_policy(f"static:{k}") == StaticK(k)


def test_policy_without_k_max_takes_the_checkpoints() -> None:
    """`--policy confadapt:0.9` on a k_max=4 checkpoint keeps the checkpoint's k_max 4, not 16."""
    stored = ConfAdapt(threshold=0.8, k_max=4)
    assert parse_policy("confadapt:0.9", stored) == ConfAdapt(threshold=0.9, k_max=4)
    assert parse_policy("confadapt", stored) == stored
    assert parse_policy("confadapt:0.9:8", stored) == ConfAdapt(threshold=0.9, k_max=8)
    assert parse_policy("static:2", stored) == StaticK(2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "/no/such/model", "--prompt", "hi"], "does not exist"),
        (["generate", "--model", "./missing-dir", "--prompt", "hi"], "does not exist"),
        (["generate", "--policy", "confadapt:2.0", "--prompt", "hi"], "threshold"),
        (["convert", "--model", "default", "--steps", "1"], "already converted"),
    ],
)
def test_command_errors_are_one_line_without_traceback(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mtp {args[0]}: error: ") and message in err[0]


def test_directory_without_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "not a model"


def test_unexpected_errors_are_one_line_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mtp_torch.cli import generate as _cmd_generate

    def boom(args: object) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(_cmd_generate, "run", boom)
    assert main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mtp generate: error: RuntimeError: disk on fire (rerun with --debug for the traceback)"
    ]
    with pytest.raises(RuntimeError):
        main(["--debug", "generate", "--prompt", "hi"])
