"""The weight-first CPU product ``skinny_linear``: same values as ``F.linear``, scoped, opt-in.

The kernel only reorders floating-point sums, so it is checked against ``F.linear`` to rounding
on random shapes, for exact fall-back where it must not act (gradients, wide inputs, subclasses),
for restoring every module on exit, and through ``MTPModel(linear_kernel="skinny")``: on a
float64 model (no argmax ties) decoding gives the very tokens of stock decoding and of
transformers' greedy search.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp_core import ConfAdapt, StaticK
from mtp_torch import MTPModel
from mtp_torch.decoding.kernels import SKINNY_MAX_ROWS, skinny_linear
from tests.synthetic import tiny_llama


def _linear(features: int, outputs: int, bias: bool, dtype: torch.dtype) -> torch.nn.Linear:
    layer = torch.nn.Linear(features, outputs, bias=bias, dtype=dtype)
    layer.requires_grad_(False)
    return layer


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    features=st.integers(1, 40),
    outputs=st.integers(1, 70),
    bias=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_skinny_equals_linear_to_rounding(
    lead: list[int], features: int, outputs: int, bias: bool, double: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    layer = _linear(features, outputs, bias, dtype)
    x = torch.randn(*lead, features, dtype=dtype)
    expected = F.linear(x, layer.weight, layer.bias)
    with skinny_linear(layer, max_rows=8):
        got = layer(x)
    assert got.shape == expected.shape
    tolerance = 1e-12 if double else 1e-5
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_the_weight_first_product_runs_for_few_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _linear(8, 5, True, torch.float32)
    calls: list[tuple[int, ...]] = []
    real_mm = torch.mm

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(b.shape))
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", spy)
    with skinny_linear(layer, max_rows=3):
        layer(torch.randn(1, 8))  # one row is padded to two columns
        layer(torch.randn(3, 8))
        wide = torch.randn(4, 8)
        assert torch.equal(layer(wide), F.linear(wide, layer.weight, layer.bias))
    assert calls == [(8, 2), (8, 3)]


def test_training_calls_run_stock() -> None:
    layer = torch.nn.Linear(6, 4)
    x = torch.randn(2, 6, requires_grad=True)
    with skinny_linear(layer):
        out = layer(x)
        out.sum().backward()
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    assert layer.weight.grad is not None and x.grad is not None


def test_forwards_are_restored_also_on_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(RuntimeError, match="boom"):
        with skinny_linear(model) as switched:
            assert switched == 2
            assert all("forward" in layer.__dict__ for layer in (model[0], model[2]))
            raise RuntimeError("boom")
    assert all("forward" not in layer.__dict__ for layer in (model[0], model[2]))


def test_nested_entries_leave_the_outer_one_in_charge() -> None:
    layer = _linear(4, 3, False, torch.float32)
    with skinny_linear(layer) as outer:
        with skinny_linear(layer) as inner:
            assert (outer, inner) == (1, 0)
        assert "forward" in layer.__dict__
    assert "forward" not in layer.__dict__


def test_linear_subclasses_are_left_alone() -> None:
    class Adapter(torch.nn.Linear):
        pass

    adapter = Adapter(4, 4)
    with skinny_linear(adapter) as switched:
        assert switched == 0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_rows_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="max_rows must be an integer >= 1"):
        with skinny_linear(torch.nn.Linear(2, 2), max_rows=bad):  # type: ignore[arg-type]
            pass


def test_unknown_kernel_names_are_refused() -> None:
    model = tiny_llama(32, dtype=torch.float64)
    with pytest.raises(ValueError, match="linear_kernel must be one of 'stock', 'skinny'"):
        MTPModel(model, linear_kernel="fast")
    mtp = MTPModel(model)
    mtp.linear_kernel = "fast"
    with pytest.raises(ValueError, match="linear_kernel must be one of"):
        mtp.generate(torch.tensor([[3, 4, 5]]), policy=StaticK(1), max_new_tokens=2)


@pytest.mark.parametrize("policy", [StaticK(1), ConfAdapt(0.3, 4), StaticK(3)], ids=str)
def test_skinny_decoding_gives_the_stock_tokens(policy: StaticK | ConfAdapt) -> None:
    model = tiny_llama(48, dtype=torch.float64, layers=2, seed=3).eval()
    model.generation_config.eos_token_id = None
    prompts = torch.tensor([[5, 9, 11, 2, 7], [1, 1, 30, 4, 8]])
    stock = MTPModel(model).generate(prompts, policy=policy, max_new_tokens=12)
    skinny = MTPModel(model, linear_kernel="skinny")
    seen: list[bool] = []
    out = skinny.generate(
        prompts,
        policy=policy,
        max_new_tokens=12,
        on_chunk=lambda row, ids: seen.append("forward" in model.lm_head.__dict__),
    )
    assert seen and all(seen), "the kernel was not active while decoding"
    assert "forward" not in model.lm_head.__dict__
    assert torch.equal(out.sequences, stock.sequences)
    assert out.num_forward_passes == stock.num_forward_passes
    if policy == StaticK(1):
        with torch.no_grad(), skinny_linear(model):
            greedy = model.generate(prompts, do_sample=False, max_new_tokens=12)
        assert torch.equal(out.sequences, greedy)


def test_from_pretrained_takes_the_kernel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama(40, dtype=torch.float32)
    MTPModel(model).save_pretrained(tmp_path / "ckpt")
    loaded = MTPModel.from_pretrained(tmp_path / "ckpt", linear_kernel="skinny")
    assert loaded.linear_kernel == "skinny"
    assert SKINNY_MAX_ROWS >= 2
