"""Bad input gets a clear error of our own (naming the argument or file), and no file is lost.

Each case is an input that could otherwise reach torch or transformers raw (IndexError,
SafetensorError, JSONDecodeError ...), do something else silently, or delete a user's file.  Each case here
asserts a ``ValueError``, ``TypeError`` or ``FileNotFoundError`` whose message names what was
wrong; the hypothesis fuzz throws arbitrary values at ``generate``'s arguments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtp_core import ConfAdapt, StaticK
from mtp_torch import DistillConfig, MTPModel, distill
from mtp_torch.cli.app import main as cli_main
from mtp_torch.training.data import TokenStream
from tests.synthetic import tiny_llama

OURS = (ValueError, TypeError, FileNotFoundError)
VOCAB = 32


@pytest.fixture(scope="module")
def mtp() -> MTPModel:
    return MTPModel(tiny_llama(VOCAB, hidden_size=16, layers=1))


def _quick(**kwargs: object) -> DistillConfig:
    values: dict[str, object] = dict(k_max=2, steps=1, seq_len=16, batch_size=1, progress=False)
    values.update(kwargs)
    return DistillConfig(**values)  # type: ignore[arg-type]


CORPUS = [[1, 2, 3] * 30]
IDS = torch.tensor([[1, 2, 3]])

CASES: dict[str, tuple[Callable[[MTPModel], object], str]] = {
    "prompt id beyond the vocabulary": (
        lambda m: m.generate(torch.tensor([[1, 2, 99]]), max_new_tokens=2),
        "vocabulary",
    ),
    "negative prompt id": (
        lambda m: m.generate(torch.tensor([[1, -2, 3]]), max_new_tokens=2),
        "vocabulary",
    ),
    "float prompt ids": (lambda m: m.generate(IDS.float(), max_new_tokens=2), "integer"),
    "list as prompt": (lambda m: m.generate([[1, 2]], max_new_tokens=2), "input_ids"),
    "max_new_tokens as text": (lambda m: m.generate(IDS, max_new_tokens="5"), "max_new_tokens"),
    "negative max_new_tokens": (lambda m: m.generate(IDS, max_new_tokens=-1), "max_new_tokens"),
    "eos as a token string": (
        lambda m: m.generate(IDS, max_new_tokens=2, eos_token_id="<eos>"),
        "eos_token_id",
    ),
    "policy as text": (lambda m: m.generate(IDS, policy="confadapt", max_new_tokens=2), "policy"),
    "negative temperature": (
        lambda m: m.generate(IDS, max_new_tokens=2, temperature=-1.0),
        "temperature",
    ),
    "verify with sampling": (
        lambda m: m.generate(IDS, max_new_tokens=2, verify=True, temperature=1.0),
        "verify",
    ),
    "mismatched attention mask": (
        lambda m: m.generate(IDS, max_new_tokens=2, attention_mask=torch.ones(1, 5)),
        "attention_mask",
    ),
    "fractional mask token id": (
        lambda m: MTPModel(tiny_llama(VOCAB, hidden_size=16, layers=1), mask_token_id=2.5),
        "mask_token_id",
    ),
    "mask token id beyond the vocabulary": (
        lambda m: MTPModel(tiny_llama(VOCAB, hidden_size=16, layers=1), mask_token_id=500),
        "mask_token_id",
    ),
    "threshold above one": (lambda m: ConfAdapt(threshold=1.5), "threshold"),
    "threshold zero": (lambda m: ConfAdapt(threshold=0.0), "threshold"),
    "k_max zero": (lambda m: ConfAdapt(k_max=0), "k_max"),
    "static k as text": (lambda m: StaticK("2"), "k"),  # type: ignore[arg-type]
    "unknown device": (lambda m: _quick(device="banana"), "device"),
    "negative seed": (lambda m: _quick(seed=-1), "seed"),
    "seed as text": (lambda m: _quick(seed="1"), "seed"),
    "negative lr": (lambda m: _quick(lr=-1e-5), "lr"),
    "unknown loss": (lambda m: _quick(loss="kl"), "loss"),
    "confident_targets above one": (lambda m: _quick(confident_targets=2.0), "confident_targets"),
    "negative lora rank": (lambda m: _quick(lora_rank=-1), "lora_rank"),
    "flat list as corpus": (
        lambda m: distill(tiny_llama(VOCAB, hidden_size=16, layers=1), [1, 2, 3] * 30, _quick()),
        "token-id lists",
    ),
    "corpus id beyond the vocabulary": (
        lambda m: distill(
            tiny_llama(VOCAB, hidden_size=16, layers=1), [[1, 2, 300] * 30], _quick()
        ),
        "vocabulary",
    ),
    "empty corpus": (
        lambda m: distill(tiny_llama(VOCAB, hidden_size=16, layers=1), [], _quick()),
        "empty",
    ),
    "corpus of text": (lambda m: TokenStream.from_sequences(["hello world"]), "token-id lists"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_a_clear_error_of_our_own(name: str, mtp: MTPModel) -> None:
    call, word = CASES[name]
    with pytest.raises(OURS) as caught:
        call(mtp)
    assert word.lower() in str(caught.value).lower(), str(caught.value)


# --- files ---------------------------------------------------------------------------------------


def _saved(tmp_path: Path, name: str = "m") -> Path:
    directory = tmp_path / name
    tiny_llama(VOCAB, hidden_size=16, layers=1).save_pretrained(directory)
    return directory


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MTPModel.from_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match="config.json"):
        MTPModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_weights_file(tmp_path: Path, damage: str) -> None:
    directory = _saved(tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(os.urandom(1000) if damage == "random" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        MTPModel.from_pretrained(directory)


def test_corrupt_resume_state(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    cfg = _quick(out_dir=str(out), resume=True)
    distill(tiny_llama(VOCAB, hidden_size=16, layers=1), CORPUS, cfg)
    latest = json.loads((out / "latest.json").read_text())["checkpoint"]
    (out / latest / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json is corrupt"):
        distill(
            tiny_llama(VOCAB, hidden_size=16, layers=1),
            CORPUS,
            _quick(out_dir=str(out), resume=True, steps=2),
        )


def test_save_keeps_a_users_files(tmp_path: Path, mtp: MTPModel) -> None:
    """save_pretrained never deletes a user's file: without overwrite it refuses, with it the file stays."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="notes.txt"):
        mtp.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "my notes"
    mtp.save_pretrained(target, overwrite=True)
    assert (target / "notes.txt").read_text() == "my notes"
    assert MTPModel.from_pretrained(target).mask_token_id == mtp.mask_token_id
    # An earlier save of ours is replaced without asking; the user's file still stays.
    mtp.save_pretrained(target, overwrite=True, threshold=0.7)
    assert (target / "notes.txt").read_text() == "my notes"
    assert MTPModel.from_pretrained(target).default_policy.threshold == 0.7  # type: ignore[attr-defined]


def test_an_earlier_save_is_replaced_whole(tmp_path: Path, mtp: MTPModel) -> None:
    target = mtp.save_pretrained(tmp_path / "out", threshold=0.8)
    (target / "leftover.bin").unlink(missing_ok=True)
    mtp.save_pretrained(target, threshold=0.6)
    assert MTPModel.from_pretrained(target).default_policy.threshold == 0.6  # type: ignore[attr-defined]
    assert not list(tmp_path.glob(".out.*")), "no staging or backup directory is left"


def test_convert_refuses_to_overwrite_a_users_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "a b c " * 40}) + "\n")
    model = _saved(tmp_path, "model")
    from tests.synthetic import make_tokenizer

    make_tokenizer().save_pretrained(model)
    args = ["convert", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--steps", "1", "--k-max", "2", "--seq-len", "16", "--batch-size", "1"]
    args += ["--no-progress", "--lora-rank", "0", "--train-layers", "all", "--no-row-windows"]
    assert cli_main(args) == 2
    assert (out / "notes.txt").read_text() == "mine"


# --- fuzz ------------------------------------------------------------------------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.lists(st.integers(-3, 40), max_size=3),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(max_new_tokens=junk, eos=junk, temperature=junk, top_p=junk)
def test_generate_never_fails_raw(
    mtp: MTPModel, max_new_tokens: object, eos: object, temperature: object, top_p: object
) -> None:
    """Any value for these arguments either decodes or raises one of our errors."""
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos)
    if temperature is not None:
        kwargs["temperature"] = temperature
    if top_p is not None:
        kwargs["top_p"] = top_p
    try:
        mtp.generate(IDS, **kwargs)  # type: ignore[arg-type]
    except OURS:
        pass


def test_convert_checks_its_output_directory_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mtp_torch.cli.convert as convert

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(convert, "_load_model", lambda *a: pytest.fail("loaded before checking"))
    assert cli_main(["convert", "--out", str(out), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_save_is_readable_like_any_new_directory(tmp_path: Path, mtp: MTPModel) -> None:
    mask = os.umask(0o022)
    try:
        target = mtp.save_pretrained(tmp_path / "out")
    finally:
        os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o755
