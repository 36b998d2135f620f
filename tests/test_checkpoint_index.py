"""Sharded checkpoints: torch.distributed.checkpoint's pickled index is read with an unpickler
that can build only metadata, and non-tensor values with weights_only, before anything runs."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mtp_torch.training.checkpoint import _weights_only_planner, check_shard_index


def _leave_marker(path: str) -> None:
    Path(path).write_text("this code ran")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_leave_marker, (str(self.marker),))


def _save(directory: Path) -> dict[str, object]:
    state = {"weight": torch.arange(6.0).reshape(2, 3), "lr": 0.1, "betas": (0.9, 0.95)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process, no process group: DCP warns
        dcp.save(state, checkpoint_id=str(directory))
    return state


def test_an_index_written_by_dcp_passes_and_loads_weights_only(tmp_path: Path) -> None:
    saved = _save(tmp_path)
    check_shard_index(tmp_path)
    loaded: dict[str, object] = {"weight": torch.zeros(2, 3), "lr": 0.0, "betas": (0.0, 0.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(tmp_path), planner=_weights_only_planner())
    assert torch.equal(loaded["weight"], saved["weight"])  # type: ignore[arg-type]
    assert loaded["lr"] == 0.1 and tuple(loaded["betas"]) == (0.9, 0.95)  # type: ignore[arg-type]


def test_a_tampered_index_is_refused_without_running_it(tmp_path: Path) -> None:
    _save(tmp_path)
    marker = tmp_path / "this-code-ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="not a checkpoint index"):
        check_shard_index(tmp_path)
    assert not marker.exists()
    (tmp_path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a checkpoint index"):
        check_shard_index(tmp_path)
    (tmp_path / ".metadata").unlink()
    with pytest.raises(ValueError, match="missing"):
        check_shard_index(tmp_path)
