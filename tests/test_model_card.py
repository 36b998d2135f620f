"""``save_pretrained`` writes a model card (README.md) and keeps the save manifest's promises.

The card names the base model, the method and paper, the MTP settings, the training summary
when one is known, and how to load the checkpoint; it is one of the files the manifest records,
so a re-save replaces it, while a README.md of the user's own is never overwritten or deleted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mtp_torch import MTPModel
from mtp_torch.decoding.card import base_model_name
from mtp_torch.weights import default as _default
from tests.synthetic import make_tokenizer, tiny_llama

SUMMARY = {
    "steps": 1000,
    "data": "64 bundled questions, answers written by the teacher",
    "loss_kind": "hard",
    "loss": 0.41234,
    "agreement": [0.99, 0.93, 0.871],
    "lora_rank": 16,
}


def fresh_mtp() -> MTPModel:
    tokenizer = make_tokenizer()
    return MTPModel(tiny_llama(len(tokenizer), hidden_size=16, layers=1), tokenizer=tokenizer)


def card(directory: Path) -> str:
    return (directory / "README.md").read_text(encoding="utf-8")


def manifest(directory: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((directory / "mtp_lm_manifest.json").read_text())
    return loaded


def test_the_card_says_what_the_checkpoint_is_and_how_to_load_it(tmp_path: Path) -> None:
    mtp = fresh_mtp()
    mtp.model.config._name_or_path = "example-org/tiny-base"
    target = mtp.save_pretrained(tmp_path / "tiny-mtp", k_max=6, threshold=0.75)
    text = card(target)
    assert text.startswith("---\n") and "base_model: example-org/tiny-base\n" in text
    assert "`example-org/tiny-base` converted into a multi-token predictor" in text
    assert "Multi-Token Prediction via Self-Distillation" in text and "Kirchenbauer" in text
    assert "2602.06019" in text
    assert f"| mask token id (`mtp_mask_token_id`) | {mtp.mask_token_id} |" in text
    assert "(`mtp_k_max`) | 6 |" in text and "(`mtp_threshold`) | 0.75 |" in text
    assert "No training summary" in text
    assert 'AutoModelForCausalLM.from_pretrained("tiny-mtp")' in text
    assert 'MTPModel.from_pretrained("tiny-mtp")' in text
    assert "README.md" in manifest(target)["files"]  # type: ignore[operator]
    # The directory is still a plain checkpoint for transformers.
    assert AutoModelForCausalLM.from_pretrained(target).config.mtp_k_max == 6


def test_the_training_summary_is_shown_and_kept_across_loads(tmp_path: Path) -> None:
    mtp = fresh_mtp()
    target = mtp.save_pretrained(tmp_path / "out", training_summary=SUMMARY)
    text = card(target)
    assert "| optimizer steps | 1000 |" in text
    assert "| training data | 64 bundled questions, answers written by the teacher |" in text
    assert "| distillation loss | hard |" in text and "| final training loss | 0.4123 |" in text
    assert "| lora_rank | 16 |" in text
    assert "| offset | 1 | 2 | 3 |" in text and "| agreement | 0.99 | 0.93 | 0.871 |" in text
    # from_pretrained restores it, and a later save (new threshold) keeps it in the card.
    loaded = MTPModel.from_pretrained(target)
    assert loaded.training_summary == SUMMARY
    loaded.save_pretrained(target, threshold=0.6)
    assert "| optimizer steps | 1000 |" in card(target) and "| 0.6 |" in card(target)
    # The attribute is the hook ``distill`` can fill; an explicit argument wins over it.
    mtp.training_summary = {"steps": 7, "agreement": torch.tensor([0.5, 0.25])}
    again = mtp.save_pretrained(tmp_path / "attr")
    assert "| optimizer steps | 7 |" in card(again) and "| agreement | 0.5 | 0.25 |" in card(again)
    override = mtp.save_pretrained(tmp_path / "arg", training_summary={"steps": 9})
    assert "| optimizer steps | 9 |" in card(override)
    with pytest.raises(TypeError, match="training_summary"):
        mtp.save_pretrained(tmp_path / "bad", training_summary=[("steps", 1)])  # type: ignore[arg-type]


def test_the_base_model_is_recorded_once_and_survives_reloads(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    base_dir = tmp_path / "my-base"
    tiny_llama(len(tokenizer), hidden_size=16, layers=1).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    mtp = MTPModel.from_pretrained(base_dir)
    first = mtp.save_pretrained(tmp_path / "converted")
    text = card(first)
    assert "`my-base` converted" in text
    assert "base_model:" not in text  # a local name is not a Hub id
    assert str(tmp_path) not in text  # no machine paths in a card
    # Reloaded, the config's _name_or_path is the converted directory; the manifest remembers.
    reloaded = MTPModel.from_pretrained(first)
    assert reloaded.base_model == "my-base"
    assert "`my-base` converted" in card(reloaded.save_pretrained(tmp_path / "again"))


def test_the_cached_default_is_named_by_its_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_default.CACHE_ENV, str(tmp_path / "cache"))
    config = tiny_llama(8, hidden_size=16, layers=1).config
    config._name_or_path = str(tmp_path / "cache" / _default.DEFAULT_MODEL_NAME)
    assert base_model_name(config) == _default.HF_MODEL_ID
    assert base_model_name(config, recorded="someone/else") == "someone/else"
    config._name_or_path = ""
    assert base_model_name(config) is None


def test_a_resave_replaces_the_card(tmp_path: Path) -> None:
    mtp = fresh_mtp()
    target = mtp.save_pretrained(tmp_path / "out", threshold=0.8)
    assert "(`mtp_threshold`) | 0.8 |" in card(target)
    mtp.save_pretrained(target, threshold=0.65)
    assert "(`mtp_threshold`) | 0.65 |" in card(target)


def test_a_users_readme_is_never_overwritten_or_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mtp = fresh_mtp()
    target = tmp_path / "out"
    target.mkdir()
    (target / "README.md").write_text("# my own notes\n")
    with pytest.raises(FileExistsError, match="README.md"):
        mtp.save_pretrained(target)
    with caplog.at_level(logging.WARNING, logger="mtp_torch.decoding.saving"):
        mtp.save_pretrained(target, overwrite=True)
    assert "no model card is written" in caplog.text
    assert card(target) == "# my own notes\n"
    assert "README.md" not in manifest(target)["files"]  # type: ignore[operator]
    # A second save keeps it too, and removing our files never touches it.
    mtp.save_pretrained(target, overwrite=True, threshold=0.7)
    assert card(target) == "# my own notes\n"
    assert MTPModel.from_pretrained(target).default_policy.threshold == 0.7  # type: ignore[attr-defined]


def test_whose_readme_it_is_follows_the_manifest(tmp_path: Path) -> None:
    """A card a save wrote is that save's file (like its config.json); any other is the user's."""
    mtp = fresh_mtp()
    target = mtp.save_pretrained(tmp_path / "out")
    assert "README.md" in manifest(target)["files"]  # type: ignore[operator]
    # Our card is ours while unchanged: a plain re-save (no overwrite needed) replaces it.
    mtp.save_pretrained(target, threshold=0.55)
    assert card(target).startswith("---\n") and "0.55" in card(target)
    # Edited by hand it is the user's (its hash no longer matches): refused, then kept.
    (target / "README.md").write_text("edited by hand\n")
    with pytest.raises(FileExistsError, match="README.md"):
        mtp.save_pretrained(target)
    mtp.save_pretrained(target, overwrite=True)
    assert card(target) == "edited by hand\n"
    # A save that did not write a card (a user's README present) leaves the next one foreign.
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("mine\n")
    mtp.save_pretrained(other, overwrite=True)
    with pytest.raises(FileExistsError, match="README.md"):
        mtp.save_pretrained(other)
    assert card(other) == "mine\n"
