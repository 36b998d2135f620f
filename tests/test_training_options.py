"""Options for large models: gradient checkpointing, the weight dtype, and their command line.

Gradient checkpointing recomputes activations instead of storing them: the loss and the
gradients must stay what they were.  ``dtype`` casts student and teacher (LoRA adapters stay
float32).  FSDP itself is tested with two processes in ``tests/test_fsdp.py``.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from mtp_torch.cli import convert
from mtp_torch.training.batch import _draw_layout, draw_batch
from mtp_torch.training.config import DistillConfig, check_resumable
from mtp_torch.training.data import TokenStream
from mtp_torch.training.distill import distill
from mtp_torch.training.parameters import find_blocks
from mtp_torch.training.step import _batch_loss, init_train_state, train_step
from tests.synthetic import tiny_llama

VOCAB = 40
CPU = torch.device("cpu")


def _corpus() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=50).tolist() for _ in range(8)]


def _config(**kwargs: object) -> DistillConfig:
    settings: dict[str, object] = {
        "k_max": 4,
        "steps": 1,
        "seq_len": 32,
        "batch_size": 2,
        "lr": 1e-2,
        "prefix_loss_weight": 1.0,
        "progress": False,
        "device": "cpu",
    }
    settings.update(kwargs)
    return DistillConfig(**settings)  # type: ignore[arg-type]


def _loss_and_gradients(cfg: DistillConfig) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """One micro-batch's loss and the trained parameters' gradients, and how many times the
    bottom block's attention ran (a recomputation shows as one run more; transformers
    checkpoints a block's ``forward``, so the hooks of the block itself run once)."""
    state = init_train_state(tiny_llama(VOCAB, hidden_size=32), None, cfg, CPU)
    calls = []
    attention = find_blocks(state.student)[0].self_attn
    attention.register_forward_hook(lambda *args: calls.append(1))
    stream = TokenStream.from_sequences(_corpus(), seed=cfg.seed)
    (packed,) = draw_batch(
        state.generator, stream, cfg, mask_token_id=state.mask_token_id, device=CPU
    )
    loss = _batch_loss(
        state.forward,
        state.student,
        state.teacher,
        packed,
        cfg,
        state.mask_token_id,
        state.autocast,
        state.teacher_context,
    ).loss
    loss.backward()  # type: ignore[no-untyped-call]
    grads = [p.grad.detach().clone() for p in state.trainable if p.grad is not None]
    assert len(grads) == len(state.trainable)
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize(
    "options",
    [
        {},  # full fine-tuning, frozen teacher copy
        {"lora_rank": 4, "train_mask_embedding": False},  # adapters only, frozen embeddings
        # adapters on the top block only, frozen embeddings: the bottom block needs no backward
        {"lora_rank": 4, "train_layers": 1, "train_mask_embedding": False},
    ],
    ids=["full", "lora-frozen-embeddings", "lora-top-block"],
)
def test_gradient_checkpointing_keeps_loss_and_gradients(options: dict[str, object]) -> None:
    plain_loss, plain_grads, plain_calls = _loss_and_gradients(_config(**options))
    loss, grads, calls = _loss_and_gradients(_config(gradient_checkpointing=True, **options))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if options.get("train_layers") is None:
        assert calls == plain_calls + 1  # the bottom block ran again in the backward pass
    else:
        assert calls == plain_calls  # nothing below the top block is recomputed or needed


def test_the_returned_model_has_checkpointing_off_and_its_cache_on() -> None:
    model = tiny_llama(VOCAB, hidden_size=32)
    mtp = distill(model, _corpus(), _config(gradient_checkpointing=True))
    assert not mtp.model.is_activation_checkpointing
    assert mtp.model.config.use_cache is not False


def test_dtype_casts_student_and_teacher_and_keeps_adapters_float32() -> None:
    cfg = _config(dtype="bfloat16", bf16=False)
    state = init_train_state(tiny_llama(VOCAB, hidden_size=32), None, cfg, CPU)
    assert state.teacher is not None
    assert {p.dtype for p in state.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in state.student.parameters()} == {torch.bfloat16}
    # Buffers stay as from_pretrained(dtype=...) leaves them: float32 rotary frequencies.
    assert {b.dtype for b in state.teacher.buffers()} == {torch.float32}
    assert {b.dtype for b in state.student.buffers()} == {torch.float32}
    lora = _config(dtype="bfloat16", bf16=False, lora_rank=4)
    state = init_train_state(tiny_llama(VOCAB, hidden_size=32), None, lora, CPU)
    dtypes = {name: p.dtype for name, p in state.student.named_parameters()}
    assert {d for name, d in dtypes.items() if "lora_" in name} == {torch.float32}
    assert {d for name, d in dtypes.items() if "lora_" not in name} == {torch.bfloat16}
    stream = TokenStream.from_sequences(_corpus(), seed=0)
    batch = draw_batch(state.generator, stream, lora, mask_token_id=state.mask_token_id, device=CPU)
    state, stats = train_step(state, batch)
    assert np.isfinite(stats.loss) and stats.grad_norm > 0


def test_dtype_is_validated_and_float32_leaves_a_float32_model_as_it_is() -> None:
    with pytest.raises(ValueError, match="dtype must be None"):
        _config(dtype="float16")
    model = tiny_llama(VOCAB, hidden_size=32)
    mtp = distill(model, _corpus(), _config(dtype="float32"))
    assert {p.dtype for p in mtp.model.parameters()} == {torch.float32}


def test_a_checkpoint_from_before_these_options_still_resumes() -> None:
    saved = _config().to_json()
    for name in ("dtype", "fsdp", "gradient_checkpointing", "attention"):
        del saved[name]
    check_resumable(saved, _config())  # absent fields ran with their defaults
    check_resumable(saved, _config(gradient_checkpointing=True, attention="sdpa"))
    with pytest.raises(ValueError, match="fsdp"):
        check_resumable(saved, _config(fsdp=True))


def test_convert_takes_the_large_model_options() -> None:
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    args = parser.parse_args(
        [
            "--fsdp",
            "--dtype",
            "bfloat16",
            "--gradient-checkpointing",
            "--attention",
            "sdpa",
            "--weight-decay",
            "0.1",
        ]
    )
    cfg = convert._config(args, convert.Path("out.ckpt"), tiny_llama(VOCAB))
    assert cfg.fsdp and cfg.dtype == "bfloat16" and cfg.gradient_checkpointing
    assert cfg.attention == "sdpa" and cfg.weight_decay == 0.1
    defaults = convert._config(parser.parse_args([]), convert.Path("out.ckpt"), tiny_llama(VOCAB))
    assert not defaults.fsdp and defaults.dtype is None and defaults.attention == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float16"])


def test_k_min_bounds_the_block_sizes_drawn() -> None:
    generator = np.random.default_rng(0)
    paper = _config(k_max=4)
    assert {_draw_layout(generator, paper).spec.k for _ in range(60)} == {2, 3, 4}
    every_offset = _config(k_max=4, k_min=4)
    assert {_draw_layout(generator, every_offset).spec.k for _ in range(20)} == {4}
    assert every_offset.max_window_len < paper.max_window_len  # no k = 2 window to fit
    for bad in (1, 5, 2.5, True):
        with pytest.raises(ValueError, match=r"k_min must be an integer in \[2, k_max=4\]"):
            _config(k_max=4, k_min=bad)


def test_k_min_is_a_recipe_setting_and_older_checkpoints_ran_with_2() -> None:
    saved = _config(k_max=4).to_json()
    del saved["k_min"]
    check_resumable(saved, _config(k_max=4))
    with pytest.raises(ValueError, match="k_min"):
        check_resumable(saved, _config(k_max=4, k_min=3))
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    args = parser.parse_args(["--k-max", "4", "--k-min", "4"])
    cfg = convert._config(args, convert.Path("out.ckpt"), tiny_llama(VOCAB))
    assert (cfg.k_min, cfg.k_max) == (4, 4)
