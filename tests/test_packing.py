"""Packed weights: a GGUF Q4_1/Q8_0 dequantization read in 4-8 bits, with the float32 results.

``pack_weight`` must keep a packing only where every block it covers rebuilds its float32
values exactly, the few-row kernel reading the packed form must give the float32 kernel's bits
for every width (1-8 rows), shape, and packed prefix, and a fused pass over a model whose
weights are such values (gated or not, batched, with a vocabulary row added after the
quantization) must give the same tokens, confidences and cache with and without packing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp_core import Sampling, StepInputs
from mtp_torch.decoding.fused import PACKED_ENV, FusedBackend
from mtp_torch.decoding.gated import add_mask_gate
from mtp_torch.decoding.kernels import fixed_plan
from mtp_torch.decoding.native import load_native
from mtp_torch.decoding.packing import BLOCK, pack_weight, unpack_weight
from tests.synthetic import tiny_llama


def _q4_1(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """float32 values as GGUF's Q4_1 dequantizes them: d * q + m, d and m float16."""
    blocks = rows * cols // BLOCK
    d = (torch.rand(blocks, 1, generator=generator) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(blocks, 1, generator=generator) * 0.05).half().float()
    q = torch.randint(0, 16, (blocks, BLOCK), generator=generator).float()
    q[:, 0], q[:, 1] = 0, 15  # the quantizer's min and max: d and m are what the block says
    return (d * q + m).reshape(rows, cols)


def _q8_0(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    blocks = rows * cols // BLOCK
    d = (torch.rand(blocks, 1, generator=generator) * 0.01 + 1e-4).half().float()
    q = torch.randint(-127, 128, (blocks, BLOCK), generator=generator).float()
    q[:, 0] = 127
    return (d * q).reshape(rows, cols)


MAKERS = {"q4_1": _q4_1, "q8_0": _q8_0}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_quantized_values_pack_exactly_and_others_do_not(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = MAKERS[kind](24, 96, generator)
    packed = pack_weight(weight)
    assert packed is not None and packed.kind == kind and packed.rows == 24
    assert torch.equal(unpack_weight(packed), weight)
    assert packed.nbytes < weight.numel() * 4 / 3
    # A row appended later (a new token's output row) stays float32; the rows before it pack.
    grown = torch.cat([weight, torch.randn(1, 96, generator=generator)])
    assert pack_weight(grown) is not None and pack_weight(grown).rows == 24  # type: ignore[union-attr]
    # Values no such quantization made, or shapes it cannot take, do not pack.
    assert pack_weight(torch.randn(24, 96, generator=generator)) is None
    assert pack_weight(weight[:, :80].contiguous()) is None  # in % 32 != 0
    assert pack_weight(weight.double()) is None
    nudged = weight.clone()
    nudged[0, 5] = torch.nextafter(nudged[0, 5], torch.tensor(1.0))  # one value one ulp off
    assert pack_weight(nudged) is None


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(sorted(MAKERS)),
    rows=st.integers(1, 80),
    blocks=st.integers(1, 6),
    n=st.integers(1, 8),
    unpacked=st.integers(0, 4),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_the_packed_kernel_gives_the_float32_kernels_bits(
    kind: str, rows: int, blocks: int, n: int, unpacked: int, threads: int, seed: int
) -> None:
    native = load_native()
    if native is None or not native.has_simd():
        pytest.skip("the packed kernel needs the compiled AVX2/AVX-512 build")
    generator = torch.Generator().manual_seed(seed)
    cols = blocks * BLOCK
    weight = MAKERS[kind](rows, cols, generator)
    # The last ``unpacked`` rows are plain float32 values (read from the float32 weight).
    extra = torch.randn(unpacked, cols, generator=generator)
    weight = torch.cat([weight, extra]).contiguous()
    packed = pack_weight(weight)
    assert packed is not None and packed.rows == rows
    x = torch.randn(n, cols, generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.packed_linear(x, weight, packed.q, packed.scales)
        expected = native.skinny_linear(x, weight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, expected)
    torch.testing.assert_close(got, x @ weight.T, rtol=1e-5, atol=1e-5)


def _quantized_model(gated: bool) -> tuple[torch.nn.Module, int]:
    """A tiny tied Llama whose products hold Q4_1 values and embedding Q8_0 ones, plus a mask
    token row appended after that quantization (as the default gets one)."""
    model = tiny_llama(63, hidden_size=64, layers=2, tie=True, seed=3).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.weight"):
                rows, cols = parameter.shape
                parameter.copy_(_q4_1(rows, cols, generator) * 4)
            elif name.endswith("embed_tokens.weight"):
                parameter.copy_(_q8_0(*parameter.shape, generator) * 8)
    model.resize_token_embeddings(64)  # the mask token's row: not a Q8_0 block
    mask = 63
    with torch.no_grad():
        model.get_input_embeddings().weight[mask].copy_(torch.randn(64, generator=generator))
    if gated:
        add_mask_gate(model, mask, rank=16)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name or "mask_embedding" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model, mask


@pytest.mark.parametrize("gated", [False, True])
def test_a_fused_pass_over_packed_weights_is_the_float32_pass(
    gated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    native = load_native()
    if native is None or not native.has_simd():
        pytest.skip("the packed kernel needs the compiled AVX2/AVX-512 build")
    model, mask = _quantized_model(gated)
    plain = FusedBackend(model, fixed_plan("native"), packed_weights=False)
    packed = FusedBackend(model, fixed_plan("native"), packed_weights=True)
    assert plain._weights.packed == []
    # Every product packs (Q4_1), and the output layer up to the mask token's row (Q8_0).
    assert sum(t.numel() > 0 for t in packed._weights.packed) == 2 * (2 * 7 + 1)
    assert packed._weights.packed[-2].shape[0] == 63
    monkeypatch.delenv(PACKED_ENV, raising=False)
    assert FusedBackend(model, fixed_plan("native"))._weights.packed == []  # opt-in
    monkeypatch.setenv(PACKED_ENV, "1")
    assert FusedBackend(model, fixed_plan("native"))._weights.packed != []
    rng = np.random.default_rng(0)
    caches = [plain.new_cache(2), packed.new_cache(2)]
    past = 0
    for width in (5, 1, 7, 3, 9):  # 9: ATen's product for the blocks, the float32 weights
        ids = rng.integers(0, 63, (2, width))
        ids[:, width // 2 :] = mask if gated else ids[:, width // 2 :]
        allowed = np.ones((2, past + width), dtype=bool)
        allowed[1, 0] = False  # left padding on row 1
        positions = np.broadcast_to(np.arange(past, past + width), (2, width)).copy()
        read = np.tile(np.arange(width), (2, 1))
        step = StepInputs(ids, positions, allowed, read)
        outs = []
        for index, backend in enumerate((plain, packed)):
            out, caches[index] = backend.forward(caches[index], step, Sampling(), 0)
            outs.append(out)
        assert np.array_equal(outs[0].tokens, outs[1].tokens)
        assert np.array_equal(outs[0].confidences, outs[1].confidences)
        length = caches[0].length
        assert torch.equal(caches[0].keys[..., :length, :], caches[1].keys[..., :length, :])
        assert torch.equal(caches[0].values[..., :length, :], caches[1].values[..., :length, :])
        past += width


@pytest.mark.parametrize("packed_weights", [False, True])
@pytest.mark.parametrize(
    ("batch", "splits"),
    [(1, (4, 4)), (1, (8,)), (1, (3, 5)), (1, (2, 1, 5)), (1, (7, 1)), (2, (4, 4)), (2, (1, 3, 4))],
)
def test_a_pass_of_n_tokens_is_n_one_token_passes_bit_for_bit(
    packed_weights: bool, batch: int, splits: tuple[int, ...]
) -> None:
    """Why verification is lossless by construction: every row of a pass the few-row kernel
    serves (up to 8 rows in all) gets the bits a one-token pass gives it (products, attention,
    cache), so a verify pass's logits are ``StaticK(1)``'s.  (Before the eleventh session a
    sum's reduction tree depended on where it fell in the kernel's block, and the rows differed
    in their last bits between widths.)"""
    native = load_native()
    if native is None or not native.has_simd():
        pytest.skip("the few-row kernel needs the compiled AVX2/AVX-512 build")
    model, mask = _quantized_model(gated=True)
    backend = FusedBackend(model, fixed_plan("native"), packed_weights=packed_weights)
    rng = np.random.default_rng(sum(splits) * 7 + len(splits))
    prompt = rng.integers(0, 63, (batch, 11))
    tokens = rng.integers(0, 63, (batch, 8))

    def run(widths: tuple[int, ...]) -> tuple[np.ndarray, torch.Tensor]:
        cache = backend.new_cache(batch)
        allowed = np.ones((batch, 11), dtype=bool)
        allowed[1:, :3] = False  # row 1 left-padded
        positions = np.tile(np.arange(11), (batch, 1))
        step = StepInputs(prompt, positions, allowed, np.full((batch, 1), 10))
        _, cache = backend.forward(cache, step, Sampling(), 0)
        confidences, past = [], 11
        for start, width in zip(np.cumsum((0, *widths[:-1])), widths, strict=True):
            allowed = np.concatenate([allowed, np.ones((batch, width), dtype=bool)], axis=1)
            positions = np.tile(np.arange(past, past + width), (batch, 1))
            ids = tokens[:, start : start + width]
            step = StepInputs(ids, positions, allowed, np.tile(np.arange(width), (batch, 1)))
            out, cache = backend.forward(cache, step, Sampling(), 0)
            confidences.append(out.confidences)
            past += width
        return np.concatenate(confidences, axis=1), cache.keys[..., :past, :].clone()

    one, keys = run((1,) * 8)
    got, got_keys = run(splits)
    assert np.array_equal(got, one)
    assert torch.equal(got_keys, keys)
    assert mask == 63  # (real tokens only here: mask rows never reach a real row)


def test_generate_reads_packed_weights_when_asked_and_decodes_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``MTP_LM_PACKED=1`` through ``MTPModel.generate``: the backend is rebuilt with packed
    weights, and every policy gives the sequences of the float32 weights."""
    from mtp_core import ConfAdapt, StaticK
    from mtp_torch import MTPModel

    native = load_native()
    if native is None or not native.has_simd():
        pytest.skip("the packed kernel needs the compiled AVX2/AVX-512 build")
    model, mask = _quantized_model(gated=True)
    model.generation_config.eos_token_id = None
    mtp = MTPModel(model, mask_token_id=mask, linear_kernel="native")
    prompts = torch.tensor([[3, 8, 1, 9, 4, 4], [7, 7, 2, 11, 5, 6]])
    policies = [StaticK(1), ConfAdapt(0.05, 4)]
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(PACKED_ENV, flag)
        backend = mtp.decoding_backend()
        assert isinstance(backend, FusedBackend)
        assert bool(backend._weights.packed) == (flag == "1")
        results[flag] = [
            mtp.generate(prompts, policy=policy, max_new_tokens=10, verify=verify).sequences
            for policy in policies
            for verify in (False, True)
        ]
    for plain, packed in zip(results["0"], results["1"], strict=True):
        assert torch.equal(plain, packed)


def test_mtp_model_packed_weights_option_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mtp_torch import MTPModel

    native = load_native()
    if native is None or not native.has_simd():
        pytest.skip("the packed kernel needs the compiled AVX2/AVX-512 build")
    model, mask = _quantized_model(gated=False)
    monkeypatch.setenv(PACKED_ENV, "1")
    off = MTPModel(model, mask_token_id=mask, linear_kernel="native", packed_weights=False)
    assert off.decoding_backend()._weights.packed == []  # type: ignore[attr-defined]
    monkeypatch.setenv(PACKED_ENV, "0")
    on = MTPModel(model, mask_token_id=mask, linear_kernel="native", packed_weights=True)
    backend = on.decoding_backend()
    assert backend._weights.packed != []  # type: ignore[attr-defined]
    assert on.decoding_backend() is backend  # built once
    on.packed_weights = False  # settable: the next call builds a float32 backend
    assert on.decoding_backend()._weights.packed == []  # type: ignore[attr-defined]
    default = MTPModel(model, mask_token_id=mask, linear_kernel="native")
    assert default.packed_weights is None
    assert default.decoding_backend()._weights.packed == []  # type: ignore[attr-defined]
