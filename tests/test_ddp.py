"""Distributed training: 2 CPU processes (gloo) equal one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mtp_torch.training.config import DistillConfig
from mtp_torch.training.distill import distill
from tests.synthetic import tiny_llama

VOCAB = 40
WORLD_SIZE = 2


def _corpus() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=50).tolist() for _ in range(12)]


def _config(gated: bool = False) -> DistillConfig:
    gate = {"lora_rank": 4, "lora_gate": "mask", "loss": "gt"} if gated else {}
    return DistillConfig(  # type: ignore[arg-type]
        k_max=4,
        steps=3,
        seq_len=32,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=1,
        mask_lr_multiplier=2.0,
        progress=False,
        device="cpu",
        **gate,
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()
    }


def _worker(rank: int, init_file: str, out_dir: str, gated: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        mtp = distill(tiny_llama(VOCAB, hidden_size=16), _corpus(), _config(gated))
        save_file(_weights(mtp.model), str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    single = _weights(distill(tiny_llama(VOCAB, hidden_size=16), _corpus(), _config()).model)
    original = _weights(tiny_llama(VOCAB, hidden_size=16))
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD_SIZE)]
    assert ranks[0].keys() == single.keys()
    moved = False
    for name, tensor in single.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-4, atol=1e-5)
        if name in original and original[name].shape == tensor.shape:
            moved = moved or not torch.equal(original[name], tensor)
    assert moved


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_gated_split_passes_under_ddp_equal_one_process(tmp_path: Path) -> None:
    # The gradient pass goes through the DDP wrapper, the real slots' pass around it.
    args = (str(tmp_path / "init"), str(tmp_path), True)
    mp.spawn(_worker, args=args, nprocs=WORLD_SIZE, join=True)
    single = _weights(distill(tiny_llama(VOCAB, hidden_size=16), _corpus(), _config(True)).model)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD_SIZE)]
    adapters = [name for name in single if "lora_B" in name]
    assert adapters and ranks[0].keys() == single.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-4, atol=1e-5)
    assert any(bool(single[name].abs().sum() > 0) for name in adapters)
