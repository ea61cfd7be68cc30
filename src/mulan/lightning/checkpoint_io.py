"""Checkpoint files: read safely with clear errors, and written so that they are either complete or absent."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mulan.export import is_safetensors, read_checkpoint_dict


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


def load_checkpoint(path: str, error: Any = None) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors for missing, unsafe or corrupted files; a
    safetensors export of :mod:`mulan.export` is read (and verified) as a checkpoint-shaped dict instead."""

    def fail(message: str) -> NoReturn:
        if error is not None:
            error(message)
        raise ValueError(message)

    file = Path(path)
    if file.is_dir():
        fail(f"checkpoint {path!r} is a directory; give the path of a .ckpt file inside it (written by mulan-cli fit).")
    if not file.is_file():
        fail(
            f"checkpoint {path!r} does not exist (give the path of a .ckpt file written by `mulan-cli fit`, or of a "
            ".safetensors file written by `python -m mulan.export`)."
        )
    if is_safetensors(file):
        try:
            return read_checkpoint_dict(file)
        except ValueError as exc:
            fail(str(exc))
    try:
        checkpoint = torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln), str(exc)[:200])
        if "global" in detail.lower() or "unsupported" in detail.lower():
            fail(
                f"checkpoint {path!r} was refused as unsafe: it holds pickled Python objects beyond tensors and plain "
                "containers (loading them could run code), and mulan loads checkpoints with weights_only=True. "
                f"Only load checkpoints you trust ({detail})."
            )
        fail(f"checkpoint {path!r} cannot be read: it is not a checkpoint, or it is truncated or corrupted ({detail}).")
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        fail(
            f"checkpoint {path!r} cannot be read: it is not a checkpoint, or it is truncated or corrupted "
            f"({type(exc).__name__}: {exc})."
        )
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        fail(f"checkpoint {path!r} is not a Lightning checkpoint (no 'state_dict'); give a .ckpt from mulan-cli fit.")
    return checkpoint
