"""bfloat16 autocast with the frozen linear weights cast once (``mtp_torch.training.casts``)."""

from __future__ import annotations

import copy

import attrs
import pytest
import torch
from torch import nn

from mtp_torch.training.batch import draw_batch
from mtp_torch.training.casts import FrozenCastAutocast, frozen_linears
from mtp_torch.training.config import DistillConfig
from mtp_torch.training.data import TokenStream
from mtp_torch.training.state import init_train_state
from mtp_torch.training.step import train_step
from tests.synthetic import make_language, tiny_llama

CPU = torch.device("cpu")


def _config(**overrides: object) -> DistillConfig:
    settings: dict[str, object] = {
        "k_max": 4, "steps": 3, "seq_len": 40, "batch_size": 2, "lr": 1e-2, "lora_rank": 4,
        "lora_gate": "mask", "loss": "gt", "progress": False, "device": "cpu", "bf16": True,
    }  # fmt: skip
    settings.update(overrides)
    return DistillConfig(**settings)  # type: ignore[arg-type]


def _trajectory(state, steps: int = 3):  # type: ignore[no-untyped-def]
    stream = TokenStream.from_sequences(make_language(32).documents(20, 30, seed=1))
    metrics = []
    for _ in range(steps):
        batch = draw_batch(
            state.generator, stream, state.config, mask_token_id=state.mask_token_id, device=CPU
        )
        state, step_metrics = train_step(state, batch)
        metrics.append(step_metrics)
    return metrics, [p.detach().clone() for p in state.trainable]


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # mask-gated, gt loss: the base model frozen
        {"loss": "hard"},  # gated, the student as its own teacher
        {"lora_gate": None, "loss": "hard"},  # peft LoRA: the teacher with adapters disabled
        {"lora_rank": 0, "lora_gate": None, "train_layers": 1, "loss": "hard"},  # a teacher copy
    ],
)
def test_casting_frozen_weights_once_keeps_the_trajectory_bitwise(
    overrides: dict[str, object],
) -> None:
    base = tiny_llama(32, layers=2, dtype=torch.float32)
    cfg = _config(**overrides)
    runs = []
    for once in (True, False):
        state = init_train_state(copy.deepcopy(base), None, cfg, CPU)
        assert isinstance(state.autocast, FrozenCastAutocast)
        initial = [p.detach().clone() for p in state.trainable]
        if not once:
            state = attrs.evolve(state, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
        runs.append(_trajectory(state))
    (once_metrics, once_params), (every_metrics, every_params) = runs
    for got, expected in zip(once_metrics, every_metrics, strict=True):
        assert got.loss == expected.loss
        assert got.agreement == expected.agreement
        assert got.accepted_at_0_9 == expected.accepted_at_0_9
        assert got.grad_norm == expected.grad_norm
    assert any(not torch.equal(p, q) for p, q in zip(once_params, initial, strict=True))
    for got_p, expected_p in zip(once_params, every_params, strict=True):
        assert torch.equal(got_p, expected_p)


def test_only_frozen_float32_linears_are_cast_and_only_inside_the_context() -> None:
    model = tiny_llama(32, layers=2, dtype=torch.float32)
    trained = model.model.layers[0].mlp.down_proj
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained.weight.requires_grad_(True)
    layers = frozen_linears([model, model], "cpu")
    assert trained not in layers
    assert len(layers) == len({id(layer) for layer in layers})  # each once
    assert all(type(layer) is nn.Linear and not layer.weight.requires_grad for layer in layers)
    assert frozen_linears([model], "cuda") == []
    context = FrozenCastAutocast("cpu", torch.bfloat16, layers)
    layer = layers[0]
    x = torch.randn(3, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
    with context:
        assert "forward" in layer.__dict__
        assert torch.equal(layer(x), expected)
        with pytest.raises(RuntimeError, match="already entered"):
            context.__enter__()
    assert "forward" not in layer.__dict__  # saving and decoding see the float32 layer
    assert layer(x).dtype == torch.float32
    # A weight changed in place is cast again at the next entry.
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        doubled = layer(x)
    with context:
        assert torch.equal(layer(x), doubled)
    assert not torch.equal(doubled, expected)


def test_a_float32_run_or_an_unfrozen_model_uses_plain_autocast() -> None:
    base = tiny_llama(32, layers=2, dtype=torch.float32)
    state = init_train_state(copy.deepcopy(base), None, _config(bf16=False), CPU)
    assert not isinstance(state.autocast, (FrozenCastAutocast, torch.autocast))
    full = _config(lora_rank=0, lora_gate=None, loss="gt")  # all linears train, no teacher
    state = init_train_state(copy.deepcopy(base), None, full, CPU)
    assert isinstance(state.autocast, torch.autocast)
