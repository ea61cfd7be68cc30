"""AtomicCheckpointIO: the temporary file lives in the destination's own directory (so the rename is atomic),
its bytes are fsync'ed before the rename, and the checkpoint gets the usual file mode (0o666 less the umask)."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mulan.lightning import checkpoint_io
from mulan.lightning.checkpoint_io import AtomicCheckpointIO

CHECKPOINT = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 3}


def _fd_path(descriptor: int) -> str:
    return os.readlink(f"/proc/self/fd/{descriptor}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd to name fsync'ed files")
def test_the_temporary_file_is_beside_the_destination_and_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str, str]] = []
    real_mkstemp, real_fsync, real_replace = tempfile.mkstemp, os.fsync, os.replace

    def mkstemp(*args, **kwargs):
        handle, name = real_mkstemp(*args, **kwargs)
        events.append(("mkstemp", name, ""))
        return handle, name

    def fsync(descriptor: int) -> None:
        events.append(("fsync", _fd_path(descriptor), ""))
        real_fsync(descriptor)

    def replace(source, destination) -> None:
        events.append(("replace", str(source), str(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(checkpoint_io.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(checkpoint_io.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_io.os, "replace", replace)
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(CHECKPOINT, target)
    monkeypatch.undo()

    (kind, temporary, _), *rest = events
    assert kind == "mkstemp" and Path(temporary).parent == target.parent  # same directory: an atomic rename
    assert ("replace", temporary, str(target)) in rest
    renamed = rest.index(("replace", temporary, str(target)))
    assert ("fsync", temporary, "") in rest[:renamed]  # the file's bytes reached the disk before the rename
    assert not Path(temporary).exists() and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    saved = torch.load(target, weights_only=True)
    assert torch.equal(saved["state_dict"]["w"], CHECKPOINT["state_dict"]["w"]) and saved["global_step"] == 3


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_the_checkpoint_has_the_umask_mode(umask: int, tmp_path: Path) -> None:
    """mkstemp creates 0o600 files: a checkpoint others in the group could not read. It gets 0o666 & ~umask, as
    a file written with open() would."""
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint(CHECKPOINT, tmp_path / "a.ckpt")
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
