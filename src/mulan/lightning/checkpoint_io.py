"""Checkpoint files that are either complete or absent, whatever interrupts the write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the destination's own directory, flushes it to disk, then
    renames it over the destination (``os.replace``, atomic on POSIX and Windows within one file system).

    A process killed mid-write leaves at most a stray ``.tmp`` file: the previous checkpoint of the same name
    (``last.ckpt``) and every other one stay loadable. (Lightning's default writes through a temporary file in the
    system's temporary directory, whose final move is a copy, not atomic, when that directory is on another file
    system.) ``mulan-cli`` uses it unless the trainer is given other plugins; in Python pass
    ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options.")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
