"""Model names and configs are checked before anything is built or fetched."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mtp_torch import MTPModel
from mtp_torch.cli.app import main as cli_main
from mtp_torch.decoding.saving import check_model_source
from tests.synthetic import make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = make_tokenizer()
    directory = tmp_path_factory.mktemp("model")
    MTPModel(
        tiny_llama(len(tokenizer), hidden_size=16, layers=1), tokenizer=tokenizer
    ).save_pretrained(directory, overwrite=True)
    return directory


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_hidden_layers", 10**6),
        ("num_attention_heads", 0),
        ("vocab_size", -5),
        ("vocab_size", 10**12),
        ("hidden_size", "64"),
        ("num_key_value_heads", 3),
    ],
)
def test_a_config_with_impossible_sizes_is_refused_naming_the_field(
    saved: Path, tmp_path: Path, field: str, value: object, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in saved.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config[field] = value
    (broken / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=field):
        MTPModel.from_pretrained(broken)
    assert time.perf_counter() - started < 5
    status = cli_main(["generate", "--model", str(broken), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and field in err, err
    assert err.startswith("mtp generate: error: ")


def test_a_missing_path_is_not_taken_for_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    started = time.perf_counter()
    with pytest.raises(
        FileNotFoundError, match="runs/smollm2-mtpp does not exist.*'hub:runs/smollm2-mtpp'"
    ):
        MTPModel.from_pretrained("runs/smollm2-mtpp")
    for name in ("./x", "~/nowhere-mtp-lm", "/abs/x", "a/b/c", "runs\\x", "org/"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            check_model_source(name)
    assert time.perf_counter() - started < 5
    status = cli_main(["generate", "--model", "runs/smollm2-mtpp", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "runs/smollm2-mtpp does not exist" in err
    # The Hub shapes stay Hub ids; "hub:" asks the Hub even where a local folder shadows it.
    assert check_model_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert check_model_source("gpt2") == "gpt2"
    assert check_model_source("hub:runs/smollm2-mtpp") == "runs/smollm2-mtpp"
