"""Checkpoint files in training: written so that they are either complete or absent (:class:`AtomicCheckpointIO`),
and kept so that ``last.ckpt`` is always the newest (:class:`LastCheckpoint`). Reading them safely, with clear
errors, is :func:`mulan.checkpoints.load_checkpoint` (pure torch; re-exported here for old imports)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mulan.checkpoints import load_checkpoint  # noqa: F401 (its old path, kept for old imports)

__all__ = ["AtomicCheckpointIO", "LastCheckpoint", "file_mode", "load_checkpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the destination's own directory, flushes it to disk, then
    renames it over the destination (``os.replace``, atomic on POSIX and Windows within one file system).

    The file gets the mode ``open()`` would give (``0o666`` less the umask), not ``mkstemp``'s ``0o600``. A
    process killed mid-write leaves at most a stray ``.tmp`` file: the previous checkpoint of the same name
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
            os.chmod(temporary, file_mode())  # mkstemp makes it 0o600; a checkpoint gets the usual mode (0o644)
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)  # and the rename itself survives a power cut


def file_mode() -> int:
    """The mode a new file gets from ``open()``: ``0o666`` less the process's umask (``0o644`` for umask 022)."""
    mask = os.umask(0o022)  # reading the umask means setting it; it is put back at once
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_directory(folder: Path) -> None:
    """Flush a directory's entries to disk (POSIX; a no-op where directories cannot be opened, as on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` always holds the newest weights: rewritten after every validation of ``fit`` (whether or not
    ``val/bpd`` improved) and when training ends (``max_steps``, ``max_epochs``, ``max_time`` or a stop), before
    weight averaging copies its average into the live model, so that resuming from it continues the run.

    Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when a top-k checkpoint
    is saved, i.e. when the monitored value improves, and not at the end of training: its ``last.ckpt`` goes stale.
    Keep the best checkpoint with a second, monitored ``ModelCheckpoint(monitor="val/bpd", filename="best-{step}")``.

    Args:
        dirpath: the folder (default: ``<log dir>/checkpoints``, as ``ModelCheckpoint``).
        every_n_train_steps: also keep a numbered copy (``epoch=E-step=S.ckpt``) every this many optimiser steps,
            all of them; 0 keeps none.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"LastCheckpoint: every_n_train_steps must be >= 0, got {every_n_train_steps}.")
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=-1 if every_n_train_steps else 0,
            every_n_train_steps=every_n_train_steps or None,
        )

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if _training_ends(trainer):
            self._save_last_now(trainer)

    def _save_last_now(self, trainer: Trainer) -> None:
        # not while sanity checking, in fast_dev_run, outside fit, or twice at one step
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _training_ends(trainer: Trainer) -> bool:
    """Whether the epoch ending now is the last of ``fit``."""
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    return (
        bool(trainer.should_stop)
        or 0 <= trainer.max_steps <= trainer.global_step
        or 0 <= max_epochs <= trainer.current_epoch + 1
    )
