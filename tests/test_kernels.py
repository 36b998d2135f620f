"""The CPU kernels of few-token passes: same values as stock, per call, per thread, measured.

Every implementation only reorders floating-point sums, so each is checked against
``F.linear`` to rounding on random shapes; decoding inside a kernel scope gives the stock
tokens on float64 models (no argmax ties) and transformers' greedy tokens in the same scope; the
few-query attention agrees with SDPA; a scope is a property of the calling thread (another
thread decoding the same modules keeps stock numerics); ``auto`` picks per width from what it
measured, caches it, and falls back to stock when measuring fails.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from mtp_core import ConfAdapt, StaticK
from mtp_torch import MTPModel
from mtp_torch.decoding import attention, calibrate, kernels
from mtp_torch.decoding.fused import FUSED_ENV, FusedBackend
from mtp_torch.decoding.kernels import (
    MAX_PLAN_ROWS,
    SKINNY_MAX_ROWS,
    KernelLinear,
    KernelPlan,
    fixed_plan,
    skinny_linear,
    use_kernels,
)
from mtp_torch.decoding.native import load_native
from tests.synthetic import tiny_llama

IMPLEMENTATIONS = ["skinny", "native"]


def _linear(features: int, outputs: int, bias: bool, dtype: torch.dtype) -> torch.nn.Linear:
    layer = torch.nn.Linear(features, outputs, bias=bias, dtype=dtype)
    layer.requires_grad_(False)
    return layer


def test_the_native_kernel_builds_here() -> None:
    # CI machines have a compiler: the compiled path must really be what these tests exercise.
    module = load_native()
    assert module is not None
    x, w = torch.randn(3, 40), torch.randn(17, 40)
    torch.testing.assert_close(module.skinny_linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(IMPLEMENTATIONS),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    features=st.integers(1, 70),
    outputs=st.integers(1, 70),
    bias=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_implementation_equals_linear_to_rounding(
    kind: str, lead: list[int], features: int, outputs: int, bias: bool, double: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    layer = _linear(features, outputs, bias, dtype)
    x = torch.randn(*lead, features, dtype=dtype)
    expected = F.linear(x, layer.weight, layer.bias)
    with use_kernels(KernelPlan((kind,) * MAX_PLAN_ROWS, name=kind), layer):
        got = layer(x)
    assert got.shape == expected.shape
    tolerance = 1e-12 if double else 1e-5
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_a_plan_runs_its_implementation_per_width(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _linear(8, 5, True, torch.float32)
    calls: list[tuple[str, int]] = []
    for kind in IMPLEMENTATIONS:
        real = kernels._PRODUCTS[kind]
        monkeypatch.setitem(
            kernels._PRODUCTS,
            kind,
            lambda x, w, kind=kind, real=real: calls.append((kind, x.shape[0])) or real(x, w),
        )
    plan = KernelPlan(("native", "skinny", "stock"), name="custom")
    with use_kernels(plan, layer):
        layer(torch.randn(1, 8))
        layer(torch.randn(2, 8))
        three, wide = torch.randn(3, 8), torch.randn(9, 8)
        assert torch.equal(layer(three), F.linear(three, layer.weight, layer.bias))
        assert torch.equal(layer(wide), F.linear(wide, layer.weight, layer.bias))
    assert calls == [("native", 1), ("skinny", 2)]


def test_training_calls_run_stock() -> None:
    layer = torch.nn.Linear(6, 4)
    x = torch.randn(2, 6, requires_grad=True)
    with use_kernels(fixed_plan("native"), layer):
        out = layer(x)
        out.sum().backward()
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    assert layer.weight.grad is not None and x.grad is not None


def test_modules_are_restored_also_on_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(RuntimeError, match="boom"):
        with use_kernels(fixed_plan("skinny"), model) as covered:
            assert covered == 2
            assert all(type(layer) is KernelLinear for layer in (model[0], model[2]))
            raise RuntimeError("boom")
    assert all(type(layer) is torch.nn.Linear for layer in (model[0], model[2]))


def test_nested_scopes_restore_only_when_the_last_ends() -> None:
    layer = _linear(4, 3, False, torch.float32)
    with skinny_linear(layer) as outer:
        with skinny_linear(layer) as inner:
            assert (outer, inner) == (1, 1)
        assert type(layer) is KernelLinear
        assert kernels.active_plan(layer) is not None
    assert type(layer) is torch.nn.Linear
    assert kernels.active_plan(layer) is None


def test_linear_subclasses_are_left_alone() -> None:
    class Adapter(torch.nn.Linear):
        pass

    adapter = Adapter(4, 4)
    with skinny_linear(adapter) as covered:
        assert covered == 0
        assert type(adapter) is Adapter


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, MAX_PLAN_ROWS + 1])
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
    with pytest.raises(ValueError, match="unknown implementations"):
        KernelPlan(("fast",))


# ------------------------------------------------------------------------------------------
# A scope belongs to its thread


def test_another_thread_keeps_stock_numerics(monkeypatch: pytest.MonkeyPatch) -> None:
    # A marked product (stock + 1) makes the kernel visible in the output.
    monkeypatch.setitem(kernels._PRODUCTS, "skinny", lambda x, w: F.linear(x, w) + 1.0)
    layer = _linear(5, 3, False, torch.float32)
    x = torch.randn(2, 5)
    stock = F.linear(x, layer.weight)
    inside, entered, done = [], threading.Event(), threading.Event()

    def with_kernel() -> None:
        with skinny_linear(layer):
            entered.set()
            done.wait(5)
            inside.append(layer(x))

    worker = threading.Thread(target=with_kernel)
    worker.start()
    assert entered.wait(5)
    try:
        outside = [layer(x) for _ in range(20)]
    finally:
        done.set()
        worker.join(5)
    assert all(torch.equal(out, stock) for out in outside), "the kernel leaked into this thread"
    assert torch.equal(inside[0], stock + 1.0)
    assert type(layer) is torch.nn.Linear


def test_threads_entering_and_leaving_at_once_leave_no_trace() -> None:
    model = tiny_llama(40, dtype=torch.float32, layers=2).eval()
    prompt = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = model.generate(prompt, do_sample=False, max_new_tokens=6)
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(15):
                with use_kernels(fixed_plan("skinny"), model), torch.no_grad():
                    model(prompt[:, :2])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    workers = [threading.Thread(target=churn) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not errors, errors
    assert all(
        type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, do_sample=False, max_new_tokens=6), expected)


def test_mtp_models_with_different_kernels_decode_side_by_side() -> None:
    model = tiny_llama(48, dtype=torch.float64, layers=2, seed=3).eval()
    model.generation_config.eos_token_id = None
    prompts = torch.tensor([[5, 9, 11, 2, 7]])
    expected = MTPModel(model).generate(prompts, policy=StaticK(3), max_new_tokens=10).sequences
    results: dict[str, list[torch.Tensor]] = {"stock": [], "native": []}
    errors: list[BaseException] = []

    def decode(kernel: str) -> None:
        try:
            mtp = MTPModel(model, linear_kernel=kernel)
            for _ in range(3):
                out = mtp.generate(prompts, policy=StaticK(3), max_new_tokens=10)
                results[kernel].append(out.sequences)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    workers = [threading.Thread(target=decode, args=(k,)) for k in ("stock", "native")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not errors, errors
    assert all(torch.equal(seq, expected) for seqs in results.values() for seq in seqs)


# ------------------------------------------------------------------------------------------
# Decoding and attention


@pytest.mark.parametrize("fused", [True, False], ids=["fused-pass", "transformers-forward"])
@pytest.mark.parametrize("kernel", ["skinny", "native", "auto"])
@pytest.mark.parametrize("policy", [StaticK(1), ConfAdapt(0.3, 4), StaticK(3)], ids=str)
def test_kernel_decoding_gives_the_stock_tokens(
    kernel: str,
    policy: StaticK | ConfAdapt,
    fused: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MTP_LM_CACHE", str(tmp_path))
    monkeypatch.setenv(FUSED_ENV, "1" if fused else "0")
    model = tiny_llama(48, dtype=torch.float64, layers=2, seed=3).eval()
    model.generation_config.eos_token_id = None
    prompts = torch.tensor([[5, 9, 11, 2, 7], [1, 1, 30, 4, 8]])
    stock = MTPModel(model).generate(prompts, policy=policy, max_new_tokens=12)
    mtp = MTPModel(model, linear_kernel=kernel)
    seen: list[bool] = []
    out = mtp.generate(
        prompts,
        policy=policy,
        max_new_tokens=12,
        on_chunk=lambda row, ids: seen.append(kernels.active_plan(model.lm_head) is not None),
    )
    # The plan swaps the Linear layers while transformers' forward decodes; the fused pass
    # (native widths on a Llama model) runs its own products and leaves them alone.
    on_fused = isinstance(mtp.decoding_backend(), FusedBackend)
    assert on_fused == (fused and "native" in mtp.kernel_plan().widths)
    assert seen and all(seen) == (not mtp.kernel_plan().is_stock and not on_fused)
    assert not any(seen) or not on_fused
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.equal(out.sequences, stock.sequences)
    assert out.num_forward_passes == stock.num_forward_passes
    if policy == StaticK(1):
        with torch.no_grad(), use_kernels(mtp.kernel_plan(), model):
            greedy = model.generate(prompts, do_sample=False, max_new_tokens=12)
        assert torch.equal(out.sequences, greedy)


@settings(max_examples=15, deadline=None)
@given(
    past=st.integers(1, 40),
    width=st.integers(2, attention.MAX_QUERIES),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_few_query_attention_agrees_with_sdpa(
    past: int, width: int, padded: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = tiny_llama(40, dtype=torch.float32, layers=2, seed=seed % 7).eval()
    ids = torch.randint(1, 40, (2, past + width))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, : max(past - 1, 0)] = 0

    def cached_pass(plan: KernelPlan) -> torch.Tensor:
        cache = DynamicCache()
        with torch.no_grad(), use_kernels(plan, model):
            model(ids[:, :past], attention_mask=mask[:, :past], cache=cache)
            return model(ids[:, past:], attention_mask=mask, cache=cache).logits

    stock = cached_pass(kernels.STOCK_PLAN)
    calls: list[int] = []
    real = attention._few_query_attention

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    attention_only = KernelPlan(("stock",), name="attention", attention=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "_few_query_attention", spy)
        from transformers import AttentionInterface

        AttentionInterface.register(attention.FEW_QUERY_ATTENTION, spy)
        try:
            ours = cached_pass(attention_only)
        finally:
            AttentionInterface.register(attention.FEW_QUERY_ATTENTION, real)
    assert calls, "the few-query attention did not run"
    rows = mask[:, past:].bool()
    torch.testing.assert_close(ours[rows], stock[rows], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# auto: measured per width, cached, safe


def test_auto_picks_the_fastest_per_width_and_keeps_stock_on_near_ties() -> None:
    layer = _linear(6, 4, False, torch.float32)
    fake = {"stock": [1.0, 1.0, 1.0], "skinny": [0.5, 0.98, 2.0], "native": [0.6, 2.0, 0.9]}

    def clock(kind: str, inputs: Any, weights: Any) -> float:
        return fake[kind][inputs[0].shape[0] - 1]

    result = calibrate.calibrate(layer, widths=3, repeats=2, clock=clock)
    assert result.plan.widths == ("skinny", "stock", "native")
    assert result.seconds == fake


def test_auto_keeps_one_kernel_across_widths_where_native_ties() -> None:
    """A one-token pass within the margin of stock runs native too once native wins wider
    passes: then a verify pass's rows have a one-token pass's bits (tests/test_packing.py)."""
    layer = _linear(6, 4, False, torch.float32)
    fake = {"stock": [1.0, 1.0, 1.0], "skinny": [3.0, 3.0, 3.0], "native": [1.03, 0.8, 1.2]}

    def clock(kind: str, inputs: Any, weights: Any) -> float:
        return fake[kind][inputs[0].shape[0] - 1]

    assert calibrate.calibrate(layer, widths=3, repeats=1, clock=clock).plan.widths == (
        "native", "native", "stock",
    )  # fmt: skip
    fake["native"] = [1.03, 1.2, 1.2]  # native wins nowhere: stock stays everywhere
    assert calibrate.calibrate(layer, widths=3, repeats=1, clock=clock).plan.widths == (
        "stock", "stock", "stock",
    )  # fmt: skip


def test_auto_caches_and_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTP_LM_CACHE", str(tmp_path))
    model = tiny_llama(32, dtype=torch.float32, layers=1)
    plan = calibrate.auto_plan(model)
    path = calibrate.calibration_path(model)
    assert path.is_file() and json.loads(path.read_text())["widths"] == list(plan.widths)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(calibrate, "calibrate", broken)
    assert calibrate.auto_plan(model) == plan
    path.write_text("{not json")  # a corrupt cache is measured again; measuring fails here
    assert calibrate.auto_plan(model) == kernels.STOCK_PLAN


def test_native_falls_back_when_it_cannot_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "load_native", lambda: None)
    plan = fixed_plan("native")
    assert set(plan.widths) == {"skinny"} and "unavailable" in plan.name


def test_a_build_killed_midway_does_not_hang_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's build waits as long as its ``lock`` file exists; a build killed midway leaves
    one.  The next build removes it (under an OS lock, which a dead process no longer holds)
    instead of waiting forever."""
    import torch.utils.cpp_extension as cpp_extension

    from mtp_torch.decoding import native

    monkeypatch.setenv("MTP_LM_CACHE", str(tmp_path))
    directory = tmp_path / "kernels" / native._build_name()
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")  # what a killed build leaves
    seen: list[bool] = []

    def fake_load(**kwargs: Any) -> str:
        seen.append((Path(kwargs["build_directory"]) / "lock").exists())
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert native._build() == "module"
    assert seen == [False]


def test_from_pretrained_takes_the_kernel(tmp_path: Path) -> None:
    model = tiny_llama(40, dtype=torch.float32)
    MTPModel(model).save_pretrained(tmp_path / "ckpt")
    loaded = MTPModel.from_pretrained(tmp_path / "ckpt", linear_kernel="native")
    assert loaded.linear_kernel == "native"
    assert loaded.kernel_plan().describe() == "native: 1-8 native"
    assert SKINNY_MAX_ROWS >= 2
