"""Two ``mtp convert`` runs never share one ``--out``: the second fails naming the first."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtp_torch.cli.app import main as cli_main
from mtp_torch.training import run_lock as run_lock_module
from mtp_torch.training.run_lock import RunLockedError, run_lock

_HOLDER = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.run_lock(sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
    """
)


def _hold(out: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, run_lock_module.__file__, str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_convert_into_a_locked_out_fails_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        status = cli_main(["convert", "--model", str(tmp_path / "no-model"), "--out", str(out)])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1, err
        assert err.startswith(f"mtp convert: error: {out} is in use by another run (pid ")
        assert f"pid {holder.pid} on {socket.gethostname()}, started " in err
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(out):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # Killed, the holder's lock is gone with it: the next run takes it.
    with run_lock(out) as path:
        assert str(os.getpid()) in path.read_text()
    assert not path.exists()  # a run that ends removes its lock file
    with pytest.raises(RuntimeError), run_lock(out):
        raise RuntimeError("a run that fails")
    assert not path.exists()  # ... and so does one that fails
