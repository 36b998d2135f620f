"""Saves survive tampered manifests, kills at every step, symlinks and concurrent threads.

The kill tests run ``write_checkpoint`` in a child process that SIGKILLs itself just before its
N-th filesystem step (rename, replace, unlink, rmdir, fsync), for every N, then check that the
next load or save finds the earlier save or the new one whole, never a mix, with no copies left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from mtp_torch import MTPModel
from mtp_torch.decoding import saving
from tests.synthetic import make_tokenizer, tiny_llama

SAVING_FILE = Path(saving.__file__)


def _fake_files(version: str):
    def write(directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps({"version": version}))
        (directory / "model.safetensors").write_text(f"weights-{version}")
        if version == "new":
            (directory / "tokenizer.json").write_text("tok-new")
        else:
            (directory / "extra_old.bin").write_text("only the old save has this")

    return write


def _version(target: Path) -> str:
    config = json.loads((target / "config.json").read_text())["version"]
    weights = (target / "model.safetensors").read_text().removeprefix("weights-")
    assert config == weights, f"config of the {config} save with weights of the {weights} one"
    return str(config)


# ---------------------------------------------------------------------------------------------
# item 4: the manifest is not trusted


def _tampered(tmp_path: Path, names: list[str]) -> Path:
    target = tmp_path / "ckpt"
    saving.write_checkpoint(target, _fake_files("old"), overwrite=False)
    for name in names:
        _list_in_manifest(target, name)
    return target


def _list_in_manifest(target: Path, name: str) -> None:
    """What a tamperer does: name ``name`` in the manifest (with a made-up hash)."""
    manifest = json.loads((target / saving.MANIFEST_FILE).read_text())
    if isinstance(manifest["files"], list):  # the format-1 manifest, before hashes
        manifest["files"].append(name)
    else:
        manifest["files"][name] = "0" * 64
    (target / saving.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_names_outside_the_directory_in_the_manifest_are_never_deleted(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("keep")
    absolute = tmp_path / "abs.txt"
    absolute.write_text("keep")
    target = _tampered(tmp_path, ["../outside/x", str(absolute)])
    (target / "notes.txt").write_text("a user's file: the save merges beside it")
    saving.write_checkpoint(target, _fake_files("new"), overwrite=True)
    assert (outside / "x").read_text() == "keep"
    assert absolute.read_text() == "keep"
    assert _version(target) == "new"
    assert (target / "notes.txt").exists()


def test_a_users_file_added_to_the_manifest_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    saving.write_checkpoint(target, _fake_files("old"), overwrite=False)
    (target / "my_notes.txt").write_text("mine")
    _list_in_manifest(target, "my_notes.txt")
    with pytest.raises(FileExistsError, match="my_notes.txt"):
        saving.write_checkpoint(target, _fake_files("new"), overwrite=False)
    saving.write_checkpoint(target, _fake_files("new"), overwrite=True)
    assert (target / "my_notes.txt").read_text() == "mine"
    # A format-1 manifest (names, no hashes) proves nothing either.
    (target / saving.MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": ["my_notes.txt"]}))
    with pytest.raises(FileExistsError, match="did not write"):
        saving.write_checkpoint(target, _fake_files("new"), overwrite=False)
    assert (target / "my_notes.txt").read_text() == "mine"


def test_a_file_changed_since_the_save_is_not_deleted(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    saving.write_checkpoint(target, _fake_files("old"), overwrite=False)
    (target / "extra_old.bin").write_text("edited by the user")
    saving.write_checkpoint(target, _fake_files("new"), overwrite=True)
    assert (target / "extra_old.bin").read_text() == "edited by the user"
    (target / "extra_old.bin").unlink()
    saving.write_checkpoint(target, _fake_files("old"), overwrite=False)
    saving.write_checkpoint(target, _fake_files("new"), overwrite=True)
    assert not (target / "extra_old.bin").exists()  # unchanged, so provably ours


def test_a_symlinked_target_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "v1"
    saving.write_checkpoint(real, _fake_files("old"), overwrite=False)
    link = tmp_path / "latest"
    link.symlink_to(real)
    saving.write_checkpoint(link, _fake_files("new"), overwrite=False)
    assert link.is_symlink() and _version(real) == "new"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="symbolic link to .*nowhere"):
        saving.write_checkpoint(dangling, _fake_files("new"), overwrite=False)


# ---------------------------------------------------------------------------------------------
# item 5: kills at every step, stale copies, orphaned saves

_CHILD = textwrap.dedent(
    """
    import importlib.util, json, os, signal, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("saving", sys.argv[1])
    saving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(saving)
    target, kill_at, overwrite = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    counter = [0]
    def killing(original):
        def step(*args, **kwargs):
            counter[0] += 1
            if counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return step
    def write(directory):
        (directory / "config.json").write_text(json.dumps({"version": "new"}))
        (directory / "model.safetensors").write_text("weights-new")
        (directory / "tokenizer.json").write_text("tok-new")
    for name in ("rename", "replace", "unlink", "rmdir", "fsync"):
        setattr(os, name, killing(getattr(os, name)))
    saving.write_checkpoint(target, write, overwrite=overwrite)
    """
)


def _kill_every_step(tmp_path: Path, user_file: bool) -> set[str]:
    seen = set()
    for kill_at in range(1, 200):
        case = tmp_path / f"k{kill_at}"
        case.mkdir()
        target = case / "ckpt"
        saving.write_checkpoint(target, _fake_files("old"), overwrite=False)
        if user_file:
            (target / "notes.txt").write_text("mine")
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(SAVING_FILE),
                str(target),
                str(kill_at),
                "1" if user_file else "0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        killed = done.returncode == -signal.SIGKILL
        assert killed or done.returncode == 0, done.stderr
        getattr(saving, "recover_checkpoint", lambda _: None)(target)  # as the next load does
        assert sorted(p.name for p in case.iterdir()) == ["ckpt"], kill_at
        version = _version(target)
        seen.add(version)
        names = {p.name for p in target.iterdir()}
        if version == "old":
            assert "tokenizer.json" not in names and "extra_old.bin" in names, kill_at
        else:
            assert "tokenizer.json" in names and "extra_old.bin" not in names, kill_at
        if user_file:
            assert (target / "notes.txt").read_text() == "mine"
        # The recovered directory is a valid save again: a plain save over it is accepted.
        saving.write_checkpoint(target, _fake_files("new"), overwrite=user_file)
        if not killed:
            return seen
    raise AssertionError("the save never finished")


def test_a_save_killed_at_any_step_leaves_old_or_new_and_no_copies(tmp_path: Path) -> None:
    assert _kill_every_step(tmp_path, user_file=False) == {"old", "new"}


def test_a_merge_killed_at_any_step_rolls_back_or_completes(tmp_path: Path) -> None:
    assert _kill_every_step(tmp_path, user_file=True) == {"old", "new"}


def test_an_orphaned_save_is_recovered_on_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = make_tokenizer()
    mtp = MTPModel(tiny_llama(len(tokenizer), hidden_size=16, layers=1), tokenizer=tokenizer)
    target = mtp.save_pretrained(tmp_path / "model")
    orphan = tmp_path / ".model.old-123-456"
    os.rename(target, orphan)  # what a kill between the two renames leaves
    (tmp_path / ".model.tmp-abc").mkdir()  # and a staging copy
    loaded = MTPModel.from_pretrained(target)
    assert loaded.mask_token_id == mtp.mask_token_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert "moved back" in caplog.text and ".model.old-123-456" in caplog.text


# ---------------------------------------------------------------------------------------------
# item 2: concurrent saves of one model


def test_concurrent_saves_record_their_own_settings(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    mtp = MTPModel(tiny_llama(len(tokenizer), hidden_size=16, layers=1), tokenizer=None)
    settings = [(k, round(0.5 + k / 40, 3)) for k in range(2, 8)]
    errors: list[BaseException] = []

    def save(index: int, k_max: int, threshold: float) -> None:
        try:
            for repeat in range(12):
                directory = tmp_path / f"s{index}-{repeat}"
                mtp.save_pretrained(directory, k_max=k_max, threshold=threshold)
                config = json.loads((directory / "config.json").read_text())
                assert (config["mtp_k_max"], config["mtp_threshold"]) == (k_max, threshold)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=save, args=(i, *s)) for i, s in enumerate(settings)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert not hasattr(mtp.model.config, "mtp_k_max") or mtp.model.config.mtp_k_max is None
    assert torch.is_tensor(next(mtp.model.parameters()))
