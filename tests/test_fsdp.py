"""Sharded training (FSDP2) with 2 CPU processes (gloo): the same run as one process or DDP.

One spawn of two processes runs, in turn: full fine-tuning under DDP and under FSDP (the frozen
teacher sharded too), then a LoRA run (with gradient checkpointing) under FSDP straight through,
and the same LoRA run killed after step 3 (last checkpoint: step 2) and resumed.  The parent compares them with single-process
runs of the same global batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mtp_torch.training.config import DistillConfig
from mtp_torch.training.distill import distill
from mtp_torch.training.step import StepMetrics
from tests.synthetic import tiny_llama

VOCAB = 41  # odd: the two shards of the embedding rows differ in size
WORLD_SIZE = 2
FULL_STEPS = 3
LORA_STEPS = 4
KILLED_AFTER = 3

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"
)


class _Killed(BaseException):
    """Stands for a SIGKILL after a step (not caught as an Exception)."""


def _corpus() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=50).tolist() for _ in range(12)]


def _full_config(**kwargs: Any) -> DistillConfig:
    settings: dict[str, Any] = {
        "k_max": 4,
        "steps": FULL_STEPS,
        "seq_len": 32,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 1e-2,
        "warmup_steps": 1,
        "mask_lr_multiplier": 2.0,
        "progress": False,
        "device": "cpu",
    }
    return DistillConfig(**{**settings, **kwargs})


def _lora_config(out_dir: Path) -> DistillConfig:
    return _full_config(
        steps=LORA_STEPS,
        lora_rank=4,
        fsdp=True,
        gradient_checkpointing=True,
        out_dir=str(out_dir),
        checkpoint_every=2,
        resume=True,
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()
    }


def _run(cfg: DistillConfig, kill_after: int | None = None) -> tuple[list[float], Any]:
    """Losses of each step and the returned model (``None`` when killed)."""
    losses: list[float] = []

    def on_step(metrics: StepMetrics) -> None:
        losses.append(metrics.loss)
        if metrics.step == kill_after:
            raise _Killed

    try:
        mtp = distill(tiny_llama(VOCAB, hidden_size=16), _corpus(), cfg, on_step=on_step)
    except _Killed:
        return losses, None
    return losses, mtp.model


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    out = Path(out_dir)
    try:
        ddp_losses, _ = _run(_full_config())
        fsdp_losses, fsdp_model = _run(_full_config(fsdp=True))
        save_file(_weights(fsdp_model), str(out / f"full-{rank}.safetensors"))
        straight_losses, straight_model = _run(_lora_config(out / "straight"))
        save_file(_weights(straight_model), str(out / f"lora-{rank}.safetensors"))
        killed_losses, _ = _run(_lora_config(out / "killed"), kill_after=KILLED_AFTER)
        resumed_losses, resumed_model = _run(_lora_config(out / "killed"))
        save_file(_weights(resumed_model), str(out / f"resumed-{rank}.safetensors"))
        losses = {
            "ddp": ddp_losses,
            "fsdp": fsdp_losses,
            "straight": straight_losses,
            "killed": killed_losses,
            "resumed": resumed_losses,
        }
        (out / f"losses-{rank}.json").write_text(json.dumps(losses), encoding="utf-8")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD_SIZE, join=True)
    return out


def _losses(out: Path, rank: int) -> dict[str, list[float]]:
    loaded: dict[str, list[float]] = json.loads((out / f"losses-{rank}.json").read_text())
    return loaded


def _assert_same_weights(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = False
) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        tolerance = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(got[name], tensor, **tolerance, msg=name)


def test_fsdp_trains_like_ddp_and_like_one_process(sharded_runs: Path) -> None:
    single_losses, single_model = _run(_full_config())
    for rank in range(WORLD_SIZE):
        losses = _losses(sharded_runs, rank)
        # Each rank's slice of the global batch: the same losses as under DDP.
        np.testing.assert_allclose(losses["fsdp"], losses["ddp"], rtol=1e-5, atol=1e-6)
    # Step 1 (same weights everywhere): the ranks' mean loss is the global batch's loss.
    first = np.mean([_losses(sharded_runs, rank)["fsdp"][0] for rank in range(WORLD_SIZE)])
    np.testing.assert_allclose(first, single_losses[0], rtol=1e-5)
    # The gathered model: the same on both ranks, and as trained by one process.
    ranks = [load_file(str(sharded_runs / f"full-{r}.safetensors")) for r in range(WORLD_SIZE)]
    _assert_same_weights(ranks[1], ranks[0], exact=True)
    _assert_same_weights(ranks[0], _weights(single_model))
    original = _weights(tiny_llama(VOCAB, hidden_size=16))
    assert any(
        not torch.equal(original[name], tensor)
        for name, tensor in ranks[0].items()
        if name in original and original[name].shape == tensor.shape
    )


def test_fsdp_with_lora_matches_one_process(sharded_runs: Path, tmp_path: Path) -> None:
    _, single_model = _run(_lora_config(tmp_path))  # fsdp=True alone: one process, unsharded
    gathered = load_file(str(sharded_runs / "lora-0.safetensors"))
    _assert_same_weights(gathered, _weights(single_model))


def test_killed_and_resumed_fsdp_run_equals_uninterrupted_run(sharded_runs: Path) -> None:
    for rank in range(WORLD_SIZE):
        losses = _losses(sharded_runs, rank)
        assert len(losses["killed"]) == KILLED_AFTER
        # Resumed from step 2 (the last checkpoint): steps 3 and 4 again, with the same losses.
        assert losses["killed"] == losses["straight"][:KILLED_AFTER]
        assert losses["resumed"] == losses["straight"][2:]
        resumed = load_file(str(sharded_runs / f"resumed-{rank}.safetensors"))
        straight = load_file(str(sharded_runs / f"lora-{rank}.safetensors"))
        _assert_same_weights(resumed, straight, exact=True)
    state = json.loads((sharded_runs / "killed" / "latest.json").read_text())
    assert state["step"] == LORA_STEPS
    checkpoint = sharded_runs / "killed" / state["checkpoint"]
    assert (checkpoint / "rng-1.safetensors").is_file() and (checkpoint / ".metadata").is_file()
    assert not list((sharded_runs / "killed").glob(".*tmp*"))
