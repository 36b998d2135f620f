"""Split student passes of gated training: real slots without autograd, then the mask slots."""

from __future__ import annotations

import copy

import pytest
import torch

from mtp_torch.training.batch import (
    draw_batch,
    forward_logits,
    split_forward_logits,
    split_forward_supported,
)
from mtp_torch.training.config import DistillConfig
from mtp_torch.training.data import TokenStream
from mtp_torch.training.state import init_train_state
from mtp_torch.training.step import train_step
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
