"""Split student passes of gated training: real slots without autograd, then the mask slots."""

from __future__ import annotations

import copy

import pytest
import torch

from mtp_core import distillation_loss
from mtp_torch.training import step as step_module
from mtp_torch.training.batch import (
    _trained_masks,
    as_index,
    draw_batch,
    forward_logits,
    split_forward_logits,
    split_forward_supported,
    split_region_logits,
    trained_regions,
)
from mtp_torch.training.config import DistillConfig
from mtp_torch.training.data import Example, TokenStream
from mtp_torch.training.state import init_train_state
from mtp_torch.training.step import _fused_ground_truth_loss, train_step
from tests.synthetic import make_language, tiny_llama
from tests.test_gated import _randomise
from tests.test_torch_decode import ARCHITECTURES, VOCAB, tiny_model

CPU = torch.device("cpu")


def _gated_config(**overrides: object) -> DistillConfig:
    settings: dict[str, object] = {
        "k_max": 4, "steps": 3, "seq_len": 40, "batch_size": 2, "lr": 1e-2, "lora_rank": 4,
        "lora_gate": "mask", "loss": "gt", "progress": False, "device": "cpu",
    }  # fmt: skip
    settings.update(overrides)
    return DistillConfig(**settings)  # type: ignore[arg-type]


def _stream(vocab: int, seed: int = 1) -> TokenStream:
    return TokenStream.from_sequences(make_language(vocab).documents(20, 30, seed=seed))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_split_passes_give_the_packed_pass_logits_and_gradients(name: str) -> None:
    model = tiny_model(name)
    state = init_train_state(model, None, _gated_config(), CPU)
    assert state.split
    _randomise(state.student)
    state.student.eval()  # no dropout (GPT-2 has it): the two runs draw no random numbers
    stream = _stream(VOCAB - 1)
    seen = set()
    for _ in range(6):  # block sizes 2-4 drawn
        packed = draw_batch(
            state.generator, stream, state.config, mask_token_id=state.mask_token_id, device=CPU
        )[0]
        seen.add(packed.k)
        results = []
        for run in (forward_logits, split_forward_logits):
            for parameter in state.trainable:
                parameter.grad = None
            logits = run(state.student, state.student, packed, packed.input_ids)
            (logits.square().sum() + logits[..., 3].sum()).backward()
            results.append((logits.detach(), [p.grad.clone() for p in state.trainable]))
        (packed_logits, packed_grads), (split_logits, split_grads) = results
        assert split_logits.shape == packed_logits.shape
        torch.testing.assert_close(split_logits, packed_logits, rtol=1e-10, atol=1e-10)
        assert any(bool(g.abs().sum() > 0) for g in packed_grads)
        for got, expected in zip(split_grads, packed_grads, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert len(seen) > 1


@pytest.mark.parametrize("loss", ["gt", "hard"])
def test_training_with_split_passes_follows_the_packed_trajectory(loss: str) -> None:
    base = tiny_llama(32, layers=2, dtype=torch.float64)
    finals = []
    for split in (True, False):
        cfg = _gated_config(loss=loss, split_passes=split)
        state = init_train_state(copy.deepcopy(base), None, cfg, CPU)
        assert state.split is split
        losses = []
        stream = _stream(32)
        for _ in range(3):
            batch = draw_batch(
                state.generator, stream, cfg, mask_token_id=state.mask_token_id, device=CPU
            )
            state, metrics = train_step(state, batch)
            losses.append(metrics.loss)
        finals.append((losses, [p.detach().clone() for p in state.trainable]))
    (split_losses, split_params), (packed_losses, packed_params) = finals
    assert split_losses == pytest.approx(packed_losses, rel=1e-9)
    for got, expected in zip(split_params, packed_params, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_passes_do_not_split_where_they_cannot() -> None:
    def split_with(**overrides: object) -> bool:
        model = tiny_llama(32, layers=1)
        return init_train_state(model, None, _gated_config(**overrides), CPU).split

    assert split_with()
    assert not split_with(split_passes=False)
    assert not split_with(fsdp=True, attention="sdpa")  # sharded passes stay one (alone: none)
    assert not split_with(lora_gate=None)  # plain LoRA trains the real slots too
    assert not split_with(lora_gate=None, lora_rank=0, train_layers=1)
    flex = tiny_llama(32, layers=1)
    flex.config._attn_implementation = "flex_attention"
    assert "flex_attention" in str(split_forward_supported(flex))
    assert split_forward_supported(tiny_llama(32, layers=1)) is None


def _context_stream(vocab: int, seed: int = 1) -> TokenStream:
    """Documents whose first ~3/4 is context (weight 0), as a corpus of prompts and replies."""
    documents = make_language(vocab).documents(20, 40, seed=seed)
    return TokenStream.from_sequences(
        [Example(doc, context_len=(3 * len(doc)) // 4) for doc in documents]
    )


def test_regions_without_a_trained_target_are_left_out_of_the_mask_pass() -> None:
    model = tiny_model("llama")
    state = init_train_state(model, None, _gated_config(), CPU)
    _randomise(state.student)
    stream = _context_stream(VOCAB - 1)
    left_out = 0
    for _ in range(8):
        packed = draw_batch(
            state.generator, stream, state.config, mask_token_id=state.mask_token_id, device=CPU
        )[0]
        weights = packed.weights[:, as_index(packed.layout.target_index, CPU)]  # (B, M, k)
        trained = (weights > 0).any(-1).any(0)  # (M,)
        run = _trained_masks(packed)
        if bool(trained.all()) or not bool(trained.any()):
            assert run is None
            continue
        assert run is not None and run.numel() == int(trained.sum()) * (packed.k - 1)
        left_out += 1
        packed_logits = forward_logits(state.student, state.student, packed, packed.input_ids)
        split_logits = split_forward_logits(state.student, state.student, packed, packed.input_ids)
        at = packed.predict_at  # (M, k) into the kept slots
        torch.testing.assert_close(
            split_logits[:, at[trained]], packed_logits[:, at[trained]], rtol=1e-10, atol=1e-10
        )
        # Left-out regions read zeros at their mask slots; their real slot is still computed.
        assert bool((split_logits[:, at[~trained][:, 1:]] == 0).all())
        torch.testing.assert_close(
            split_logits[:, at[~trained][:, 0]], packed_logits[:, at[~trained][:, 0]]
        )
    assert left_out >= 2


def _train_on_context(state, counts, steps: int = 4):  # type: ignore[no-untyped-def]
    """``steps`` training steps on the context stream: (metrics, trained parameters, how many
    of the steps' first micro-batches ``counts`` held true for)."""
    stream = _context_stream(32)
    seen, counted = [], 0
    for _ in range(steps):
        batch = draw_batch(
            state.generator, stream, state.config, mask_token_id=state.mask_token_id, device=CPU
        )
        counted += bool(counts(batch[0]))
        state, metrics = train_step(state, batch)
        seen.append(metrics)
    return seen, [p.detach().clone() for p in state.trainable], counted


def _leaves_regions_out(packed) -> bool:  # type: ignore[no-untyped-def]
    found = trained_regions(packed)
    return found is not None and found.numel() < packed.layout.target_index.shape[0]


@pytest.mark.parametrize("loss", ["gt", "hard"])
def test_leaving_out_untrained_regions_keeps_the_trajectory_and_metrics(loss: str) -> None:
    base = tiny_llama(32, layers=2, dtype=torch.float64)
    runs = []
    for split in (True, False):
        cfg = _gated_config(loss=loss, split_passes=split, confident_targets=0.5)
        state = init_train_state(copy.deepcopy(base), None, cfg, CPU)
        metrics_seen, params, left_out = _train_on_context(
            state, lambda packed: _trained_masks(packed) is not None
        )
        assert left_out >= 2, "the batches must have regions to leave out"
        runs.append((metrics_seen, params))
    (split_metrics, split_params), (packed_metrics, packed_params) = runs
    for got, expected in zip(split_metrics, packed_metrics, strict=True):
        assert got.loss == pytest.approx(expected.loss, rel=1e-9)
        assert got.agreement == pytest.approx(expected.agreement, rel=1e-9)
        assert got.accepted_at_0_9 == pytest.approx(expected.accepted_at_0_9, rel=1e-9)
        assert got.supervised_tokens == expected.supervised_tokens
    for got_p, expected_p in zip(split_params, packed_params, strict=True):
        torch.testing.assert_close(got_p, expected_p, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_region_logits_are_the_packed_pass_logits_at_those_regions(name: str) -> None:
    model = tiny_model(name)
    state = init_train_state(model, None, _gated_config(), CPU)
    _randomise(state.student)
    state.student.eval()
    stream = _context_stream(VOCAB - 1)
    subsets = 0
    for _ in range(6):
        packed = draw_batch(
            state.generator, stream, state.config, mask_token_id=state.mask_token_id, device=CPU
        )[0]
        regions = trained_regions(packed)
        if regions is None:
            continue
        subsets += regions.numel() < packed.layout.target_index.shape[0]
        for parameter in state.trainable:
            parameter.grad = None
        packed_logits = forward_logits(state.student, state.student, packed, packed.input_ids)
        expected = packed_logits[:, packed.predict_at[regions]]  # (B, R, k, V)
        (expected.square().sum() + expected[..., 3].sum()).backward()
        packed_grads = [p.grad.clone() for p in state.trainable]
        for parameter in state.trainable:
            parameter.grad = None
        got = split_region_logits(state.student, state.student, packed, packed.input_ids, regions)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)
        (got.square().sum() + got[..., 3].sum()).backward()
        for got_g, expected_g in zip([p.grad for p in state.trainable], packed_grads, strict=True):
            torch.testing.assert_close(got_g, expected_g, rtol=1e-9, atol=1e-9)
    assert subsets >= 1, "some batch must leave regions out"


def test_the_fused_gt_loss_is_the_core_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 11, dtype=torch.float64, generator=generator) * 4
    targets = torch.randint(0, 11, (2, 5, 3), generator=generator)
    targets[0, 1, 2] = -1  # ignored, like weight 0
    weights = torch.rand(2, 5, 3, dtype=torch.float64, generator=generator)
    weights[1, :2] = 0.0
    for w in (weights, torch.zeros_like(weights)):
        core_input = logits.clone().requires_grad_(True)
        fused_input = logits.clone().requires_grad_(True)
        core = distillation_loss(core_input, None, kind="gt", targets=targets, weights=w)
        fused = _fused_ground_truth_loss(fused_input, targets, w)
        torch.testing.assert_close(fused, core, rtol=1e-12, atol=1e-12)
        core.backward()
        fused.backward()
        torch.testing.assert_close(fused_input.grad, core_input.grad, rtol=1e-12, atol=1e-12)
    assert float(_fused_ground_truth_loss(logits, targets, torch.zeros_like(weights))) == 0.0


@pytest.mark.parametrize("confident", [None, 0.5])
def test_training_on_region_logits_keeps_the_trajectory_and_metrics(
    confident: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_llama(32, layers=2, dtype=torch.float64)
    runs = []
    for regions in (True, False):
        monkeypatch.setattr(step_module, "_REGION_LOGITS", regions)
        cfg = _gated_config(confident_targets=confident)
        state = init_train_state(copy.deepcopy(base), None, cfg, CPU)
        seen, params, subsets = _train_on_context(state, _leaves_regions_out)
        assert subsets >= 2, "the batches must have regions to leave out"
        runs.append((seen, params))
    (region_metrics, region_params), (kept_metrics, kept_params) = runs
    for got, expected in zip(region_metrics, kept_metrics, strict=True):
        assert got.loss == pytest.approx(expected.loss, rel=1e-9)
        assert got.agreement == pytest.approx(expected.agreement, rel=1e-9)
        assert got.accepted_at_0_9 == pytest.approx(expected.accepted_at_0_9, rel=1e-9)
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-8)
    for got_p, expected_p in zip(region_params, kept_params, strict=True):
        torch.testing.assert_close(got_p, expected_p, rtol=1e-8, atol=1e-10)
