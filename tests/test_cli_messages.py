"""Careless command lines get one clear line, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtp_torch import MTPModel
from mtp_torch.cli.app import main as cli_main
from tests.synthetic import make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = make_tokenizer()
    directory = tmp_path_factory.mktemp("m") / "tiny"
    model = tiny_llama(len(tokenizer), hidden_size=16, layers=1)
    return MTPModel(model, tokenizer=tokenizer).save_pretrained(directory)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
        (["--temperature", "0.7", "--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--device", "tpu"], "--device 'tpu' is not a device PyTorch knows"),
        (["--prompt", "bad \udcff bytes"], "--prompt is not valid UTF-8 text"),
    ],
)
def test_generate_options(
    model_dir: Path, extra: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2"]
    assert cli_main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtp generate: error: ") and expected in err and err.count("\n") == 1


def test_bench_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--model", "default", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path} is a directory" in err and err.count("\n") == 1


def test_a_closed_pipe_is_one_line(model_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "mtp_torch.cli", "generate", "--model", str(model_dir)]
    command += ["--prompt", "hi", "--max-new-tokens", "64", "--json"]
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: the first write fails with EPIPE
    done = subprocess.run(command, stdout=writer, stderr=subprocess.PIPE, text=True, env=env)
    os.close(writer)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "mtp generate: error: the output pipe was closed"
    ), done.stderr
    assert "Traceback" not in done.stderr


_BINARY = b'{"question": "ok"}\n{"question": "\xff\xfe bad"}\n'


@pytest.mark.parametrize(("command", "name"), [("bench", "p.jsonl"), ("convert", "c.txt")])
def test_a_binary_data_file_names_the_file_and_the_byte(
    model_dir: Path, tmp_path: Path, command: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / name
    data.write_bytes(_BINARY)
    argv = [command, "--model", str(model_dir), "--data", str(data)]
    argv += ["--out", str(tmp_path / "out")] + (["--steps", "1"] if command == "convert" else [])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    # The first bad byte is the 34th: the first line is 19 bytes, then 14 before it.
    line = f"mtp {command}: error: {data} is not UTF-8 text: byte 33 (0xff) is invalid"
    assert err.strip().splitlines()[-1].startswith(line) and err.count("error") == 1, err
