"""The numpy reference backend: safetensors reading, logits against transformers, decoding.

torch/transformers appear here only to write tiny random checkpoints and to serve as the
reference; ``mtp_numpy`` itself never imports them (see ``test_no_torch.py``).

transformers computes RMSNorm and the RoPE tables in float32 even for a float64 model, so its
float64 logits carry ~1e-7 relative error.  Tight comparisons therefore run against the stock
transformers modules with those two functions swapped for exact float64 versions
(``_exact_float64``); one test also checks the stock model at float32-level tolerance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtp_core import ConfAdapt, Sampling, StaticK, StepInputs, decode, load_backend
from mtp_numpy import (
    KVCache,
    LlamaWeights,
    NumpyBackend,
    forward_logits,
    generate,
    read_safetensors,
    sample_tokens,
    write_safetensors,
)
from tests import strategies as S

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97
MASK = VOCAB - 1  # an ordinary id of the (untrained) vocabulary stands in for <mtp_mask>
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


# --- reference helpers --------------------------------------------------------------------------


def _exact_rms_norm_forward(self: Any, hidden: Any) -> Any:
    mean_square = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(mean_square + self.variance_epsilon))


def _exact_rotary_forward(self: Any, x: Any, position_ids: Any) -> Any:
    angles = position_ids[..., None].to(torch.float64) * self.inv_freq.to(torch.float64)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


@contextlib.contextmanager
def _exact_float64() -> Iterator[None]:
    """Make transformers' Llama/Qwen2/Mistral RMSNorm and RoPE compute in the input dtype."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2

    with pytest.MonkeyPatch.context() as patch:
        for module, prefix in (
            (modeling_llama, "Llama"),
            (modeling_qwen2, "Qwen2"),
            (modeling_mistral, "Mistral"),
        ):
            patch.setattr(getattr(module, f"{prefix}RMSNorm"), "forward", _exact_rms_norm_forward)
            patch.setattr(
                getattr(module, f"{prefix}RotaryEmbedding"), "forward", _exact_rotary_forward
            )
        yield


def _hf_logits(model: Any, token_ids: Any) -> np.ndarray:
    with torch.no_grad(), _exact_float64():
        return model(torch.as_tensor(np.asarray(token_ids))).logits.numpy()


def _hf_greedy(model: Any, prompt: list[int], max_new_tokens: int, stop: int | None) -> list[int]:
    """transformers' own greedy ``generate`` (float64, exact norms), stop token kept."""
    with torch.no_grad(), _exact_float64():
        output = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            eos_token_id=stop,
            pad_token_id=0,
        )
    tokens = output[0, len(prompt) :].tolist()
    if stop is not None and stop in tokens:
        tokens = tokens[: tokens.index(stop) + 1]
    return tokens


def _numpy_greedy(
    weights: LlamaWeights, prompt: list[int], max_new_tokens: int, stop: frozenset[int]
) -> list[int]:
    """Plain greedy decoding that recomputes the whole sequence every step (no cache)."""
    sequence = list(prompt)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = forward_logits(weights, KVCache.empty(weights, 1), [sequence])
        token = int(np.argmax(logits[0, -1]))
        generated.append(token)
        sequence.append(token)
        if token in stop:
            break
    return generated


# --- tiny checkpoints ---------------------------------------------------------------------------


@dataclasses.dataclass
class Checkpoint:
    path: Path
    model: Any  # the transformers model, float64, eval mode
    backend: NumpyBackend  # float64


def _make_checkpoint(
    root: Path,
    name: str,
    family: str,
    seed: int,
    mtp_mask: int | None = None,
    collapse_from: int | None = None,
    **overrides: Any,
) -> Checkpoint:
    """Save a tiny random float64 model and load it back on both sides.

    ``collapse_from``: give every token id from there on (the mask id included) the same
    embedding row and sharpen the output layer.  The model then cannot tell those tokens from a
    mask, so its proposals at mask positions often equal its greedy tokens: verification sees
    a real mix of accepted and rejected drafts, and confidences spread over (0, 1).
    """
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    torch.manual_seed(seed)
    config = config_class(**{**TINY, **overrides})
    model = model_class(config).to(torch.float64).eval()
    if collapse_from is not None:
        with torch.no_grad():
            embed = model.model.embed_tokens.weight
            embed[collapse_from:] = embed[collapse_from:].mean(dim=0, keepdim=True)
            model.lm_head.weight.mul_(50.0)
    path = root / name
    model.save_pretrained(path)
    if mtp_mask is not None:
        config_path = path / "config.json"
        data = json.loads(config_path.read_text())
        data["mtp_mask_token_id"] = mtp_mask
        config_path.write_text(json.dumps(data))
    return Checkpoint(path, model, NumpyBackend.from_pretrained(path, dtype=np.float64))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("numpy_backend")
    return {
        "llama": _make_checkpoint(root, "llama", "llama", seed=0, mtp_mask=MASK),
        "llama_tied": _make_checkpoint(
            root, "llama_tied", "llama", seed=1, tie_word_embeddings=True
        ),
        "qwen2": _make_checkpoint(root, "qwen2", "qwen2", seed=2),
        "drafty": _make_checkpoint(root, "drafty", "llama", seed=0, collapse_from=20),
        "mistral": _make_checkpoint(root, "mistral", "mistral", seed=3, sliding_window=40),
        "llama3_rope": _make_checkpoint(
            root,
            "llama3_rope",
            "llama",
            seed=4,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            num_attention_heads=2,
            num_key_value_heads=1,  # head_dim 16: more frequencies, all three llama3 bands
        ),
    }


@pytest.fixture(scope="module")
def llama(checkpoints: dict[str, Checkpoint]) -> Checkpoint:
    return checkpoints["llama"]


# --- safetensors ----------------------------------------------------------------------------------


def test_safetensors_round_trip_all_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((3, 4)),
        "f32": rng.standard_normal((2, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, (2, 2)),
        "i32": rng.integers(-1000, 1000, (4,)).astype(np.int32),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, metadata={"format": "np"})
    loaded = read_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(loaded[name], value)
    # The reference implementation reads what we write.
    from safetensors.numpy import load_file

    for name, value in load_file(str(path)).items():
        np.testing.assert_array_equal(value, tensors[name])


def test_safetensors_reads_torch_files_including_bf16(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = {
        "bf16": torch.randn(5, 6).to(torch.bfloat16),
        "f16": torch.randn(3).to(torch.float16),
        "f32": torch.randn(2, 2),
        "i64": torch.arange(6).reshape(2, 3),
    }
    path = tmp_path / "torch.safetensors"
    save_file(source, str(path))
    loaded = read_safetensors(path)
    assert loaded["bf16"].dtype == np.float32
    np.testing.assert_array_equal(loaded["bf16"], source["bf16"].float().numpy())
    np.testing.assert_array_equal(loaded["f16"], source["f16"].numpy())
    np.testing.assert_array_equal(loaded["f32"], source["f32"].numpy())
    np.testing.assert_array_equal(loaded["i64"], source["i64"].numpy())
    assert set(read_safetensors(path, ["f32"])) == {"f32"}
    with pytest.raises(ValueError, match="no tensor"):
        read_safetensors(path, ["missing"])


def _corruptions(good: bytes) -> dict[str, bytes]:
    (header_len,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + header_len])

    def with_header(new_header: dict[str, Any]) -> bytes:
        encoded = json.dumps(new_header).encode()
        return struct.pack("<Q", len(encoded)) + encoded + good[8 + header_len :]

    wrong_shape = json.loads(json.dumps(header))
    wrong_shape["a"]["shape"] = [3, 3]
    bad_dtype = json.loads(json.dumps(header))
    bad_dtype["a"]["dtype"] = "Q7"
    overlap = json.loads(json.dumps(header))
    overlap["b"]["data_offsets"] = [
        0,
        overlap["b"]["data_offsets"][1] - overlap["b"]["data_offsets"][0],
    ]
    return {
        "empty": b"",
        "short length": good[:5],
        "truncated data": good[:-3],
        "header length too large": struct.pack("<Q", 10**12) + good[8:],
        "header not json": struct.pack("<Q", header_len)
        + b"{" * header_len
        + good[8 + header_len :],
        "header not object": with_header([1, 2]),  # type: ignore[arg-type]
        "shape does not match offsets": with_header(wrong_shape),
        "unknown dtype": with_header(bad_dtype),
        "overlapping tensors": with_header(overlap),
    }


def test_corrupt_safetensors_raise_value_error(tmp_path: Path) -> None:
    path = tmp_path / "good.safetensors"
    write_safetensors(path, {"a": np.ones((2, 3)), "b": np.arange(4, dtype=np.int64)})
    good = path.read_bytes()
    for label, data in _corruptions(good).items():
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="safetensors") as info:
            read_safetensors(bad)
        assert "bad.safetensors" in str(info.value), label


def test_corrupt_checkpoint_fails_loading(tmp_path: Path, llama: Checkpoint) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama.path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        NumpyBackend.from_pretrained(broken)


def test_sharded_checkpoint_matches_single_file(tmp_path: Path, llama: Checkpoint) -> None:
    sharded = tmp_path / "sharded"
    llama.model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    backend = NumpyBackend.from_pretrained(sharded, dtype=np.float64)
    token_ids = np.arange(10)[None] % VOCAB
    got, _ = forward_logits(backend.weights, KVCache.empty(backend.weights, 1), token_ids)
    want, _ = forward_logits(
        llama.backend.weights, KVCache.empty(llama.backend.weights, 1), token_ids
    )
    np.testing.assert_array_equal(got, want)


# --- configuration errors -------------------------------------------------------------------------


def _with_config(tmp_path: Path, source: Path, **changes: Any) -> Path:
    target = tmp_path / "edited"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"model_type": "qwen3"}, "model_type 'qwen3' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_unsupported_configs_raise(
    tmp_path: Path, llama: Checkpoint, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        NumpyBackend.from_pretrained(_with_config(tmp_path, llama.path, **changes))


def test_missing_weights_and_pickles_are_refused(tmp_path: Path, llama: Checkpoint) -> None:
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(llama.path / "config.json", no_weights / "config.json")
    (no_weights / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        NumpyBackend.from_pretrained(no_weights)
    with pytest.raises(ValueError, match="config.json"):
        NumpyBackend.from_pretrained(tmp_path)
    untied = _with_config(tmp_path, llama.path, num_hidden_layers=3)
    with pytest.raises(ValueError, match="model.layers.2"):
        NumpyBackend.from_pretrained(untied)


def test_old_style_rope_config_is_read(tmp_path: Path, llama: Checkpoint) -> None:
    config = json.loads((llama.path / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    old = _with_config(tmp_path, llama.path)
    (old / "config.json").write_text(
        json.dumps({**config, "rope_theta": theta, "rope_scaling": None})
    )
    backend = NumpyBackend.from_pretrained(old, dtype=np.float64)
    np.testing.assert_array_equal(
        backend.weights.inverse_frequencies, llama.backend.weights.inverse_frequencies
    )


# --- logits against transformers ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "mistral", "llama3_rope"])
def test_full_sequence_logits_match_transformers(
    checkpoints: dict[str, Checkpoint], name: str
) -> None:
    checkpoint = checkpoints[name]
    weights = checkpoint.backend.weights
    token_ids = np.random.default_rng(1).integers(0, VOCAB, (3, 37))
    got, cache = forward_logits(weights, KVCache.empty(weights, 3), token_ids)
    np.testing.assert_allclose(got, _hf_logits(checkpoint.model, token_ids), rtol=0, atol=1e-9)
    assert cache.length == 37
    assert cache.keys[0].shape == (
        3,
        weights.config.num_key_value_heads,
        37,
        weights.config.head_dim,
    )


def test_architecture_details_are_loaded(checkpoints: dict[str, Checkpoint]) -> None:
    tied = checkpoints["llama_tied"].backend.weights
    assert tied.lm_head is tied.embed_tokens
    untied = checkpoints["llama"].backend.weights
    assert not np.array_equal(untied.lm_head, untied.embed_tokens)
    qwen = checkpoints["qwen2"].backend.weights
    assert qwen.layers[0].q_proj.bias is not None and qwen.layers[0].o_proj.bias is None
    assert untied.layers[0].q_proj.bias is None
    # llama3 scaling changes some, not all, frequencies.
    scaled = checkpoints["llama3_rope"].backend.weights
    plain = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    changed = ~np.isclose(scaled.inverse_frequencies, plain, rtol=1e-12)
    assert changed.any() and not changed.all()


def test_stock_transformers_agree_to_float32_precision(llama: Checkpoint) -> None:
    token_ids = np.random.default_rng(2).integers(0, VOCAB, (2, 30))
    with torch.no_grad():
        stock = llama.model(torch.as_tensor(token_ids)).logits.numpy()
    got, _ = forward_logits(
        llama.backend.weights, KVCache.empty(llama.backend.weights, 2), token_ids
    )
    np.testing.assert_allclose(got, stock, rtol=0, atol=1e-6)


def test_float32_compute_is_close(llama: Checkpoint) -> None:
    weights32 = NumpyBackend.from_pretrained(llama.path, dtype=np.float32).weights
    assert weights32.dtype == np.float32
    token_ids = np.random.default_rng(3).integers(0, VOCAB, (2, 20))
    got, _ = forward_logits(weights32, KVCache.empty(weights32, 2), token_ids)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _hf_logits(llama.model, token_ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_incremental_decoding_with_cache_matches_full(
    checkpoints: dict[str, Checkpoint], name: str
) -> None:
    checkpoint = checkpoints[name]
    weights = checkpoint.backend.weights
    token_ids = np.random.default_rng(4).integers(0, VOCAB, (2, 16))
    want = _hf_logits(checkpoint.model, token_ids)
    cache = KVCache.empty(weights, 2)
    start = 0
    for chunk in (5, 1, 3, 1, 6):
        block = token_ids[:, start : start + chunk]
        got, cache = forward_logits(weights, cache, block)
        np.testing.assert_allclose(got, want[:, start : start + chunk], rtol=0, atol=1e-9)
        start += chunk
    assert cache.length == 16


def test_holes_in_the_attention_mask_are_invisible(llama: Checkpoint) -> None:
    """Junk slots hidden by the mask change nothing; crop and slot re-indexing remove them."""
    weights = llama.backend.weights
    rng = np.random.default_rng(5)
    sequence = rng.integers(0, VOCAB, (2, 12))
    junk = rng.integers(0, VOCAB, (2, 3))
    row1_block = rng.integers(0, VOCAB, 6)
    want0 = _hf_logits(llama.model, sequence[:1])[0]
    # Row 1 keeps its first two junk slots as real tokens 6, 7 and hides only the third.
    row1_sequence = np.concatenate([sequence[1, :6], junk[1, :2], row1_block])
    want1 = _hf_logits(llama.model, row1_sequence[None])[0]

    cache = KVCache.empty(weights, 2)
    _, cache = forward_logits(weights, cache, sequence[:, :6])
    _, cache = forward_logits(weights, cache, junk, np.stack([6 + np.arange(3)] * 2))
    visible = np.ones((2, 9 + 6), dtype=bool)
    visible[0, 6:9] = False
    visible[1, 8] = False
    block = np.stack([sequence[0, 6:12], row1_block])
    positions = np.stack([6 + np.arange(6), 8 + np.arange(6)])
    got, holed = forward_logits(weights, cache, block, positions, visible)
    np.testing.assert_allclose(got[0], want0[6:12], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[1], want1[8:14], rtol=0, atol=1e-9)
    assert holed.length == 15

    # Compaction through reindex: visible slots right-aligned, row 0 gets 2 hidden fillers.
    slots = np.array([[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
    compact = cache.reindex(np.array([0, 1]), slots)
    assert compact.length == 8
    mask = np.ones((2, 8 + 4), dtype=bool)
    mask[0, :2] = False
    got, _ = forward_logits(
        weights,
        compact,
        np.stack([sequence[0, 6:10], row1_block[:4]]),
        np.stack([6 + np.arange(4), 8 + np.arange(4)]),
        mask,
    )
    np.testing.assert_allclose(got[0], want0[6:10], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[1], want1[8:12], rtol=0, atol=1e-9)

    # Crop + row selection: drop the junk entirely, keep only row 0.
    cropped = cache.crop(6).reindex(np.array([0]))
    got, _ = forward_logits(weights, cropped, sequence[:1, 6:])
    np.testing.assert_allclose(got[0], want0[6:], rtol=0, atol=1e-9)


def test_fully_masked_query_gives_finite_output(llama: Checkpoint) -> None:
    weights = llama.backend.weights
    hidden_none = np.zeros((1, 2), dtype=bool)
    logits, _ = forward_logits(weights, KVCache.empty(weights, 1), [[3, 4]], [[0, 1]], hidden_none)
    assert np.isfinite(logits).all()


def test_cache_validation(llama: Checkpoint) -> None:
    backend = llama.backend
    cache = backend.new_cache(2)
    assert backend.cache_length(cache) == 0
    with pytest.raises(ValueError, match="crop"):
        backend.crop(cache, 1)
    with pytest.raises(ValueError, match="rows"):
        backend.reindex(cache, np.array([2]), None)
    with pytest.raises(ValueError, match="token ids"):
        forward_logits(backend.weights, cache, [[VOCAB, 0], [0, 0]])
    with pytest.raises(ValueError, match="attention_mask"):
        forward_logits(
            backend.weights, cache, [[1, 0], [0, 0]], [[0, 1], [0, 1]], np.ones((2, 3), bool)
        )


def test_sliding_window_beyond_reach_is_refused(checkpoints: dict[str, Checkpoint]) -> None:
    weights = checkpoints["mistral"].backend.weights
    with pytest.raises(ValueError, match="sliding window"):
        forward_logits(weights, KVCache.empty(weights, 1), np.zeros((1, 41), dtype=np.int64))


# --- the Backend protocol -------------------------------------------------------------------------


def test_backend_forward_reads_requested_positions(llama: Checkpoint) -> None:
    backend = llama.backend
    token_ids = np.random.default_rng(6).integers(0, VOCAB, (2, 7))
    want = _hf_logits(llama.model, token_ids)
    read_index = np.array([[0, 3, 6], [6, 6, 2]])
    inputs = StepInputs(
        token_ids=token_ids,
        position_ids=np.arange(7)[None].repeat(2, 0),
        attention_mask=np.ones((2, 7), dtype=bool),
        read_index=read_index,
    )
    outputs, cache = backend.forward(backend.new_cache(2), inputs, Sampling(), seed=0)
    assert backend.cache_length(cache) == 7
    picked = np.take_along_axis(want, read_index[..., None], axis=1)
    np.testing.assert_array_equal(outputs.tokens, picked.argmax(-1))
    probs = np.exp(picked - picked.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(outputs.confidences, probs.max(-1), rtol=1e-9)
    assert outputs.tokens.dtype == np.int64 and outputs.confidences.dtype == np.float64
    # Confidences stay the untempered top-1 probability under sampling.
    sampled, _ = backend.forward(backend.new_cache(2), inputs, Sampling(temperature=3.0), seed=1)
    np.testing.assert_allclose(sampled.confidences, outputs.confidences, rtol=1e-12)


def test_entry_point_and_attributes(llama: Checkpoint) -> None:
    assert load_backend("numpy") is NumpyBackend
    assert llama.backend.vocab_size == VOCAB
    assert llama.backend.max_position_embeddings == 128
    assert llama.backend.config["mtp_mask_token_id"] == MASK
    assert llama.backend.mask_token_id == MASK


def test_sample_tokens_filters_and_distribution() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    assert sample_tokens(logits, Sampling(temperature=1.0, top_k=1), rng).tolist() == [0]
    assert sample_tokens(logits, Sampling(temperature=1.0, top_p=0.4), rng).tolist() == [0]
    draws = sample_tokens(np.repeat(logits, 20000, 0), Sampling(temperature=1.0), rng)
    np.testing.assert_allclose(
        np.bincount(draws, minlength=4) / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.015
    )
    top2 = sample_tokens(np.repeat(logits, 20000, 0), Sampling(temperature=1.0, top_k=2), rng)
    np.testing.assert_allclose(
        np.bincount(top2, minlength=4) / 20000, [0.625, 0.375, 0, 0], atol=0.015
    )
    nucleus = sample_tokens(np.repeat(logits, 20000, 0), Sampling(temperature=1.0, top_p=0.75), rng)
    assert set(np.unique(nucleus).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    hot = sample_tokens(np.repeat(logits, 20000, 0), Sampling(temperature=2.0), rng)
    tempered = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(
        np.bincount(hot, minlength=4) / 20000, tempered / tempered.sum(), atol=0.015
    )
    same = [
        sample_tokens(np.repeat(logits, 50, 0), Sampling(temperature=1.0), np.random.default_rng(7))
        for _ in range(2)
    ]
    np.testing.assert_array_equal(*same)


# --- decoding on the numpy backend ----------------------------------------------------------------


def _decode(
    backend: NumpyBackend, prompts: list[list[int]], policy: Any, **kwargs: Any
) -> list[list[int]]:
    result = decode(backend, prompts, policy, mask_token_id=MASK, **kwargs)
    return [row.tolist() for row in result.tokens]


def test_static_one_and_verify_equal_transformers_generate(llama: Checkpoint) -> None:
    prompts = [[5, 17, 3, 88], [1], [42, 42, 7, 9, 60, 2, 11]]
    max_new = 14
    want = [_hf_greedy(llama.model, prompt, max_new, stop=None) for prompt in prompts]
    assert want == [_numpy_greedy(llama.backend.weights, p, max_new, frozenset()) for p in prompts]
    stop = want[0][5]
    want_stop = [_hf_greedy(llama.model, prompt, max_new, stop=stop) for prompt in prompts]
    assert len(want_stop[0]) <= 6
    for policy, verify in [
        (StaticK(1), False),
        (StaticK(1), True),
        (ConfAdapt(0.01, 4), True),
        (StaticK(3), True),
    ]:
        for expected, stop_ids in [(want, ()), (want_stop, (stop,))]:
            kwargs = dict(max_new_tokens=max_new, stop_token_ids=stop_ids, verify=verify)
            assert _decode(llama.backend, prompts, policy, **kwargs) == expected
            assert [_decode(llama.backend, [p], policy, **kwargs)[0] for p in prompts] == expected


@given(
    prompts=S.prompt_batches(vocab_size=VOCAB, max_batch=3, max_len=10),
    policy=S.policies,
    verify=st.booleans(),
    max_new_tokens=st.integers(0, 12),
    stop_pick=st.one_of(st.none(), st.integers(0, 11)),
)
def test_lossless_decoding_equals_greedy(
    checkpoints: dict[str, Checkpoint],
    prompts: list[list[int]],
    policy: Any,
    verify: bool,
    max_new_tokens: int,
    stop_pick: int | None,
) -> None:
    """StaticK(1) (either mode) and any policy with verify=True give plain greedy tokens."""
    if not verify:
        policy = StaticK(1)
    backend = checkpoints["drafty"].backend
    weights = backend.weights
    reference = [_numpy_greedy(weights, p, max_new_tokens, frozenset()) for p in prompts]
    stop: tuple[int, ...] = ()
    if stop_pick is not None and reference[0]:
        stop = (reference[0][stop_pick % len(reference[0])],)  # a token that really occurs
        reference = [_numpy_greedy(weights, p, max_new_tokens, frozenset(stop)) for p in prompts]
    kwargs = dict(max_new_tokens=max_new_tokens, stop_token_ids=stop, verify=verify)
    assert _decode(backend, prompts, policy, **kwargs) == reference
    if len(prompts) > 1:
        assert [_decode(backend, [p], policy, **kwargs)[0] for p in prompts] == reference


@given(
    prompts=S.prompt_batches(vocab_size=VOCAB, max_batch=3, max_len=10),
    policy=S.policies,
    name=st.sampled_from(["drafty", "qwen2"]),
    max_new_tokens=st.integers(1, 14),
    use_stop=st.booleans(),
)
def test_batch_equals_one_by_one_without_verify(
    checkpoints: dict[str, Checkpoint],
    prompts: list[list[int]],
    policy: Any,
    name: str,
    max_new_tokens: int,
    use_stop: bool,
) -> None:
    backend = checkpoints[name].backend
    kwargs = dict(max_new_tokens=max_new_tokens, stop_token_ids=(7, 40, 55) if use_stop else ())
    batched = _decode(backend, prompts, policy, **kwargs)
    single = [_decode(backend, [p], policy, **kwargs)[0] for p in prompts]
    assert batched == single
    assert all(len(tokens) <= max_new_tokens for tokens in batched)


class _SpyBackend(NumpyBackend):
    """Counts slot-compacting ``reindex`` calls made by the engine."""

    compactions = 0

    def reindex(self, cache: KVCache, rows: Any, slots: Any) -> KVCache:
        if slots is not None:
            self.compactions += 1
        return super().reindex(cache, rows, slots)


@pytest.mark.parametrize(
    ("policy", "verify"),
    [
        (StaticK(1), False),
        (StaticK(4), True),
        (ConfAdapt(0.3, 6), True),
        (ConfAdapt(0.3, 6), False),
    ],
)
def test_cache_compaction_keeps_outputs(
    checkpoints: dict[str, Checkpoint], policy: Any, verify: bool
) -> None:
    """Prompts of very different lengths leave > 32 holes, so the engine compacts the cache."""
    drafty = checkpoints["drafty"]
    backend = _SpyBackend(drafty.backend.weights, drafty.backend.config)
    rng = np.random.default_rng(8)
    prompts = [[3], rng.integers(0, VOCAB, 50).tolist(), rng.integers(0, VOCAB, 9).tolist()]
    kwargs = dict(max_new_tokens=20, verify=verify)
    batched = _decode(backend, prompts, policy, **kwargs)
    assert backend.compactions > 0
    single = [_decode(drafty.backend, [p], policy, **kwargs)[0] for p in prompts]
    assert batched == single
    if verify or policy == StaticK(1):
        weights = drafty.backend.weights
        assert batched == [_numpy_greedy(weights, p, 20, frozenset()) for p in prompts]


def test_verify_reaches_mixed_acceptance(checkpoints: dict[str, Checkpoint]) -> None:
    """Lossless mode accepts some drafts and rejects others, so the equivalence is not vacuous."""
    prompts = [[5, 17, 3, 88], [1], [42, 42, 7, 9, 60, 2, 11]]
    for policy in (StaticK(4), ConfAdapt(0.3, 4)):
        result = decode(
            checkpoints["drafty"].backend,
            prompts,
            policy,
            mask_token_id=MASK,
            max_new_tokens=40,
            verify=True,
        )
        histogram = result.accepted_histogram
        assert histogram[1] > 0 and histogram[2:4].sum() > 0 and histogram[4] > 0, histogram


def test_sampling_is_seeded_and_batch_independent_of_verify_flag(llama: Checkpoint) -> None:
    sampling = Sampling(temperature=1.5, top_p=0.9, top_k=20)
    prompts = [[1, 2, 3], [4]]
    first = _decode(
        llama.backend, prompts, ConfAdapt(0.05, 4), max_new_tokens=10, sampling=sampling, seed=3
    )
    again = _decode(
        llama.backend, prompts, ConfAdapt(0.05, 4), max_new_tokens=10, sampling=sampling, seed=3
    )
    assert first == again
    assert all(len(row) == 10 for row in first)
    with pytest.raises(ValueError, match="verify"):
        _decode(
            llama.backend, prompts, StaticK(2), max_new_tokens=4, sampling=sampling, verify=True
        )


def test_generate_reads_mask_id_from_config(checkpoints: dict[str, Checkpoint]) -> None:
    llama = checkpoints["llama"]
    prompts = [[5, 17, 3], [9]]
    expected = _decode(llama.backend, prompts, ConfAdapt(0.05, 3), max_new_tokens=8)
    from_path = generate(
        llama.path,
        prompts,
        ConfAdapt(0.05, 3),
        max_new_tokens=8,
        dtype=np.float64,
        stop_token_ids=(),
    )
    assert [row.tolist() for row in from_path.tokens] == expected
    from_backend = generate(
        llama.backend, prompts, ConfAdapt(0.05, 3), max_new_tokens=8, stop_token_ids=()
    )
    assert [row.tolist() for row in from_backend.tokens] == expected
    chunks: list[tuple[int, list[int]]] = []
    generate(
        llama.backend,
        [[1]],
        StaticK(2),
        max_new_tokens=4,
        stop_token_ids=(),
        on_chunk=lambda r, t: chunks.append((r, t.tolist())),
    )
    assert sum(len(t) for _, t in chunks) == 4
    plain = checkpoints["qwen2"]
    with pytest.raises(ValueError, match="mtp_mask_token_id"):
        generate(plain.backend, prompts, StaticK(2), max_new_tokens=4)
    explicit = generate(plain.backend, prompts, StaticK(2), max_new_tokens=4, mask_token_id=MASK)
    assert all(len(row) == 4 for row in explicit.tokens)
    with pytest.raises(ValueError, match="context window"):
        generate(llama.backend, [[1] * 120], StaticK(1), max_new_tokens=20)
