"""The fused decoding backend: one compiled call per pass, the same tokens as transformers' forward.

``FusedBackend`` restates a Llama pass (norms, rotary, attention over preallocated buffers,
SiLU MLP, mask-gated adapters) in C++.  On float64 models it must give transformers' tokens for
every policy, batch shape, padding and pass width; on float32 models its confidences agree to
rounding; its cache crops and gathers like ``DynamicCache``; the gate still touches only mask
rows; and a model it cannot restate is left to ``TorchBackend`` with the reason said.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp_core import ConfAdapt, Sampling, StaticK, StepInputs
from mtp_torch import MTPModel
from mtp_torch.decoding.backend import TorchBackend
from mtp_torch.decoding.fused import FusedBackend, FusedCache, fused_unavailable_reason
from mtp_torch.decoding.gated import add_mask_gate, find_mask_gate
from mtp_torch.decoding.kernels import fixed_plan
from tests.synthetic import tiny_llama

POLICIES = [StaticK(1), ConfAdapt(0.05, 4), StaticK(3), ConfAdapt(0.5, 3)]


def _pair(model: torch.nn.Module, mask_token_id: int | None = None) -> tuple[MTPModel, MTPModel]:
    stock = MTPModel(model, mask_token_id=mask_token_id)
    fused = MTPModel(model, mask_token_id=stock.mask_token_id, linear_kernel="native")
    assert isinstance(fused.decoding_backend(), FusedBackend)
    assert type(stock.decoding_backend()) is TorchBackend
    return stock, fused


@settings(max_examples=12, deadline=None)
@given(
    heads_and_groups=st.sampled_from([(4, 2), (4, 4), (6, 2), (2, 1)]),
    layers=st.integers(1, 3),
    tie=st.booleans(),
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    pad=st.integers(0, 4),
    policy=st.sampled_from(POLICIES),
    verify=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_float64_decoding_gives_transformers_tokens(
    heads_and_groups: tuple[int, int],
    layers: int,
    tie: bool,
    batch: int,
    length: int,
    pad: int,
    policy: StaticK | ConfAdapt,
    verify: bool,
    seed: int,
) -> None:
    heads, kv_heads = heads_and_groups
    model = tiny_llama(
        61, hidden_size=8 * heads, layers=layers, heads=heads, kv_heads=kv_heads, tie=tie,
        dtype=torch.float64, seed=seed, initializer_range=0.3,
    ).eval()  # fmt: skip
    model.generation_config.eos_token_id = None
    stock, fused = _pair(model)
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 60, (batch, length + pad), generator=generator)
    mask = torch.ones_like(prompts)
    mask[0, :pad] = 0  # the first row is left-padded
    options = dict(attention_mask=mask, policy=policy, verify=verify, max_new_tokens=10)
    expected = stock.generate(prompts, **options)
    got = fused.generate(prompts, **options)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.num_forward_passes == expected.num_forward_passes


def _inputs(ids: np.ndarray, past: int, allowed: np.ndarray, read: np.ndarray) -> StepInputs:
    batch, width = ids.shape
    positions = np.broadcast_to(np.arange(past, past + width), (batch, width))
    return StepInputs(ids, positions.copy(), allowed, read)


@pytest.mark.parametrize(("hidden", "heads"), [(48, 6), (64, 4), (128, 4)])  # head size 8, 16, 32
def test_float32_passes_agree_to_rounding_and_caches_crop_and_gather_alike(
    hidden: int, heads: int
) -> None:
    model = tiny_llama(70, hidden_size=hidden, layers=2, heads=heads, kv_heads=2, seed=1).eval()
    reference = TorchBackend(model)
    fused = FusedBackend(model, fixed_plan("native"))
    backends: tuple[Any, ...] = (reference, fused)
    rng = np.random.default_rng(0)
    caches: list[Any] = [reference.new_cache(3), fused.new_cache(3)]
    past = 0
    for width in (7, 1, 4, 8, 3, 12):
        ids = rng.integers(0, 70, (3, width))
        allowed = np.ones((3, past + width), dtype=bool)
        allowed[1, 0] = False  # a hole: row 1 never attends its first slot
        read = np.tile(np.arange(width), (3, 1))
        outs = []
        for index, backend in enumerate(backends):
            out, caches[index] = backend.forward(
                caches[index], _inputs(ids, past, allowed, read), Sampling(), 0
            )
            outs.append(out)
        np.testing.assert_allclose(outs[1].confidences, outs[0].confidences, rtol=1e-4, atol=1e-5)
        assert (outs[1].tokens == outs[0].tokens).mean() > 0.95
        past += width
        if width == 4:  # drop two slots, as after a step's mask positions
            caches = [b.crop(c, past - 2) for b, c in zip(backends, caches, strict=True)]
            past -= 2
        if width == 8:  # keep rows 2 and 0, each with its own slots
            rows = np.array([2, 0])
            slots = np.stack([np.arange(past)[::-1], np.arange(past)])
            caches = [b.reindex(c, rows, slots) for b, c in zip(backends, caches, strict=True)]
            again = np.array([0, 1, 1])
            caches = [b.reindex(c, again, None) for b, c in zip(backends, caches, strict=True)]
    assert fused.cache_length(caches[1]) == reference.cache_length(caches[0]) == past


def test_the_cache_grows_past_its_first_capacity() -> None:
    model = tiny_llama(40, layers=1, dtype=torch.float64, seed=2, max_positions=1024).eval()
    model.generation_config.eos_token_id = None
    stock, fused = _pair(model)
    prompt = torch.randint(0, 39, (1, 300))
    options = dict(policy=ConfAdapt(0.3, 4), max_new_tokens=300)
    assert torch.equal(fused.generate(prompt, **options).sequences,
                       stock.generate(prompt, **options).sequences)  # fmt: skip
    cache = FusedCache(torch.zeros(1, 1, 1, 4, 2), torch.zeros(1, 1, 1, 4, 2), length=3)
    cache.keys[..., :3, :] = 7.0
    cache.reserve(10)
    assert cache.keys.shape[3] >= 10 and bool((cache.keys[..., :3, :] == 7.0).all())


def _gated(dtype: torch.dtype, rank: int = 4) -> tuple[torch.nn.Module, MTPModel]:
    model = tiny_llama(50, hidden_size=32, layers=2, dtype=dtype, seed=4).eval()
    model.generation_config.eos_token_id = None
    stock = MTPModel(model)
    gate = add_mask_gate(model, stock.mask_token_id, rank=rank)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "mask_embedding" in name:
                parameter.copy_(torch.randn_like(parameter))
    assert find_mask_gate(model) is gate
    return model, stock


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_gated_models_decode_alike_and_real_rows_stay_the_base_models(
    policy: StaticK | ConfAdapt,
) -> None:
    model, stock = _gated(torch.float64)
    _, fused = _pair(model, stock.mask_token_id)
    prompts = torch.tensor([[3, 8, 1, 9, 4, 4], [7, 7, 2, 11, 5, 6]])
    expected = stock.generate(prompts, policy=policy, max_new_tokens=12)
    got = fused.generate(prompts, policy=policy, max_new_tokens=12)
    assert torch.equal(got.sequences, expected.sequences)
    # Real rows of a float32 gated pass are bitwise those of the same pass without the gate.
    model32, stock32 = _gated(torch.float32)
    plain = tiny_llama(50, hidden_size=32, layers=2, seed=4).eval()
    plain.resize_token_embeddings(model32.get_input_embeddings().weight.shape[0])
    plain.load_state_dict(
        {k: v for k, v in model32.state_dict().items() if "lora" not in k and "mtp_gate" not in k
         and "base_layer" not in k}
        | {k.replace(".base_layer", ""): v for k, v in model32.state_dict().items()
           if "base_layer" in k},
    )  # fmt: skip
    ids = np.array([[3, 8, stock32.mask_token_id, 9, stock32.mask_token_id]])
    inputs = _inputs(ids, 0, np.ones((1, 5), dtype=bool), np.arange(5)[None])
    backends = [FusedBackend(m, fixed_plan("native")) for m in (model32, plain)]
    outs = [b.forward(b.new_cache(1), inputs, Sampling(), 0)[0] for b in backends]
    assert np.array_equal(outs[0].confidences[0, :2], outs[1].confidences[0, :2])
    assert not np.array_equal(outs[0].confidences[0, 2:], outs[1].confidences[0, 2:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 2])  # 6 rows: the few-row kernel; 12: ATen's product
@pytest.mark.parametrize("rank", [4, 16])  # 16: the update folded into the SIMD lanes
def test_gated_passes_match_the_gated_module_on_both_product_paths(
    dtype: torch.dtype, batch: int, rank: int
) -> None:
    model, stock = _gated(dtype, rank)
    mask = stock.mask_token_id
    ids = np.array([[3, 8, 1, mask, mask, mask], [7, 2, mask, 9, mask, 4]][:batch])
    read = np.tile(np.arange(6), (batch, 1))
    inputs = _inputs(ids, 0, np.ones((batch, 6), dtype=bool), read)
    fused = FusedBackend(model, fixed_plan("native"))
    got = fused.forward(fused.new_cache(batch), inputs, Sampling(), 0)[0]
    want = stock.backend.forward(stock.backend.new_cache(batch), inputs, Sampling(), 0)[0]
    assert np.array_equal(got.tokens, want.tokens)
    tolerance = 1e-6 if dtype == torch.float64 else 1e-5  # norms: float32 statistics, any order
    np.testing.assert_allclose(got.confidences, want.confidences, rtol=tolerance, atol=tolerance)


def test_models_it_cannot_restate_stay_on_transformers_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2)).eval()
    assert "GPT2LMHeadModel" in str(fused_unavailable_reason(gpt2))
    assert type(MTPModel(gpt2, linear_kernel="native").decoding_backend()) is TorchBackend
    half = tiny_llama(40, layers=1, dtype=torch.bfloat16)
    assert "float32 or float64" in str(fused_unavailable_reason(half))
    with pytest.raises(ValueError, match="cannot run this model"):
        FusedBackend(half, fixed_plan("native"))
    model = tiny_llama(40, layers=1)
    assert fused_unavailable_reason(model) is None
    monkeypatch.setenv("MTP_LM_FUSED", "0")
    assert "MTP_LM_FUSED=0" in str(fused_unavailable_reason(model))
    assert type(MTPModel(model, linear_kernel="native").decoding_backend()) is TorchBackend
    # A stock plan never runs the fused pass: exact transformers numerics stay the default.
    monkeypatch.delenv("MTP_LM_FUSED")
    assert type(MTPModel(model).decoding_backend()) is TorchBackend


def test_the_backend_is_reused_until_the_weights_change(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama(50, hidden_size=32, layers=2, seed=5).double().eval()
    stock, fused = _pair(model, 49)
    first = fused.decoding_backend()
    assert fused.decoding_backend() is first  # same weights, same plan: built once
    prompts = torch.tensor([[3, 8, 1, 9, 4, 4]])
    # A new tensor in place of a weight (or a gate added) builds a new pass that reads it.
    torch.manual_seed(9)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    assert fused.decoding_backend() is not first
    expected = stock.generate(prompts, policy=StaticK(1), max_new_tokens=8).sequences
    assert torch.equal(fused.generate(prompts, policy=StaticK(1), max_new_tokens=8).sequences,
                       expected)  # fmt: skip
    add_mask_gate(model, 49, rank=4, alpha=4.0)
    assert find_mask_gate(model) is not None
    gated = fused.decoding_backend()
    assert isinstance(gated, FusedBackend) and gated._weights.adapters
    # An in-place update (an optimizer step, a load) builds it again too.
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    assert fused.decoding_backend() is not gated
    again = MTPModel(model, mask_token_id=49)
    assert torch.equal(fused.generate(prompts, policy=StaticK(1), max_new_tokens=8).sequences,
                       again.generate(prompts, policy=StaticK(1), max_new_tokens=8).sequences)  # fmt: skip
    monkeypatch.setenv("MTP_LM_FUSED", "0")
    assert not isinstance(fused.decoding_backend(), FusedBackend)


@pytest.mark.parametrize("batch", [1, 2])  # 6 rows: the few-row kernel; 12: ATen's product
@pytest.mark.parametrize("rank", [4, 16])  # 16: the update folded into the SIMD lanes
def test_float16_adapters_and_any_thread_count_give_the_same_bits(batch: int, rank: int) -> None:
    model, stock = _gated(torch.float32, rank)
    mask = stock.mask_token_id
    gate = find_mask_gate(model)
    assert gate is not None
    with torch.no_grad():  # adapters as a delta shipped in float16 holds them
        for module in model.modules():
            for name in ("lora_A", "lora_B"):
                if isinstance(getattr(module, name, None), torch.Tensor):
                    getattr(module, name).copy_(getattr(module, name).half().float())
    ids = np.array([[3, 8, 1, mask, mask, mask], [7, 2, mask, 9, mask, 4]][:batch])
    read = np.tile(np.arange(6), (batch, 1))
    inputs = _inputs(ids, 0, np.ones((batch, 6), dtype=bool), read)
    outs = []
    threads = torch.get_num_threads()
    # One thread computes each A x whole; several split A's rows between them: the same bits.
    for half, count in ((False, 2), (True, 2), (None, 2), (False, 1), (True, 1)):
        backend = FusedBackend(model, fixed_plan("native"), half_adapters=half)
        stored = {a.dtype for a in backend._weights.adapters if a.numel()}
        assert stored == {torch.float16 if half is not False else torch.float32}
        cache = backend.new_cache(batch)
        torch.set_num_threads(count)
        try:
            out = backend.forward(cache, inputs, Sampling(), 0)[0]
        finally:
            torch.set_num_threads(threads)
        outs.append((out.tokens, out.confidences, cache.keys[:, :, :, : cache.length].clone()))
    for tokens, confidences, keys in outs[1:]:
        assert np.array_equal(tokens, outs[0][0])
        assert np.array_equal(confidences, outs[0][1])
        assert torch.equal(keys, outs[0][2])
    # Values float16 cannot hold keep float32 storage (and float16 is refused).
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("lora_B")).add_(1e-4)
    auto = FusedBackend(model, fixed_plan("native"))
    assert {a.dtype for a in auto._weights.adapters if a.numel()} == {torch.float32}
    with pytest.raises(ValueError, match="float16"):
        FusedBackend(model, fixed_plan("native"), half_adapters=True)
