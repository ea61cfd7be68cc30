"""Checkpoint and export files, read without unpickling anything and written so that a change is detected.

Two kinds of file hold a trained model:

* a Lightning checkpoint (``.ckpt``, written by ``mulan-cli fit``), read by :func:`load_checkpoint` with
  ``torch.load(weights_only=True)``: tensors and plain containers only;
* a mulan export (``.safetensors``, written by :func:`write_export` through ``python -m mulan.export``): the
  :class:`~mulan.model.DiffusionModel`'s tensors (names as in its ``state_dict``), and the metadata (safetensors'
  string-to-string header) ``model_config`` and ``data_config`` (the JSON of the checkpoint's ``hyper_parameters``
  and ``datamodule_hyper_parameters``) and ``sha256`` (:func:`digest`, of the tensors and every other entry).
  :func:`read_export` refuses a file whose SHA-256 does not match: it detects accidental or careless changes, but it
  is not a signature (whoever edits the file can recompute it).

Building a model from an export, and writing one from a checkpoint, is :mod:`mulan.export`'s part. This module
imports only torch and safetensors (no Lightning, no other mulan module).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

__all__ = [
    "Export",
    "digest",
    "is_safetensors",
    "load_checkpoint",
    "read_checkpoint_dict",
    "read_export",
    "write_export",
]

FORMAT = "mulan-export"
FORMAT_VERSION = 1
MODEL_PREFIX = "model."
"""Where :class:`~mulan.lightning.DiffusionTask` keeps its :class:`~mulan.model.DiffusionModel`."""
REEXPORT = "Export the checkpoint again: python -m mulan.export CHECKPOINT.ckpt OUT.safetensors."


@dataclass
class Export:
    """The content of an export file: ``tensors`` (the DiffusionModel's state dict), ``model_config`` and
    ``data_config`` (the saved hyper-parameters; ``data_config`` may be None) and the raw ``metadata``."""

    tensors: dict[str, Tensor]
    model_config: dict[str, Any]
    data_config: dict[str, Any] | None
    metadata: dict[str, str]


# ------------------------------------------------------------------------------------------------ export format
def is_safetensors(path: str | Path) -> bool:
    """True for a ``.safetensors`` name, or a file whose first bytes are a safetensors header (a little-endian
    8-byte header length, then ``{``)."""
    if Path(path).suffix.lower() == ".safetensors":
        return True
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 2**32


def digest(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 (hex) of every tensor (name, dtype, shape, then its bytes) and every metadata entry but
    ``sha256``, in sorted order."""
    sha = hashlib.sha256()
    for key in sorted(metadata):
        if key != "sha256":
            sha.update(json.dumps([key, metadata[key]]).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        sha.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def write_export(
    tensors: dict[str, Tensor],
    model_config: dict[str, Any],
    data_config: dict[str, Any] | None,
    out: str | Path,
    **info: str,
) -> Path:
    """Write an export file: ``tensors`` (a DiffusionModel's state dict), the configurations as JSON and the
    ``info`` strings as metadata, with the SHA-256 of all of it. Returns the path written."""
    from safetensors.torch import save_file

    try:
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "model_config": json.dumps(model_config, sort_keys=True),
            "data_config": json.dumps(data_config, sort_keys=True),
            **info,
        }
    except TypeError as error:
        raise ValueError(
            f"the configuration cannot be written as JSON ({error}): export needs the plain configuration that "
            "mulan-cli fit saves (class paths and init args), not Python objects."
        ) from error
    plain = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}
    metadata["sha256"] = digest(plain, metadata)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(plain, str(out), metadata=metadata)
    return out


def read_export(path: str | Path) -> Export:
    """Read and verify an export file (the format, then the SHA-256 of its tensors and configuration)."""
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file (give a .safetensors file written by python -m mulan.export).")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise ValueError(
            f"{path} cannot be read: it is not a safetensors file, or it is truncated or corrupted "
            f"({type(error).__name__}: {error}). {REEXPORT}"
        ) from error
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a mulan export (its metadata has no format={FORMAT!r}), so the "
            f"configuration needed to rebuild the model is missing. {REEXPORT}"
        )
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer mulan (export format {version}; this one reads up to "
            f"{FORMAT_VERSION}). Upgrade mulan to load it."
        )
    recorded, actual = metadata.get("sha256"), digest(tensors, metadata)
    if recorded != actual:
        raise ValueError(
            f"{path} was modified after export: the SHA-256 of its tensors and configuration is {actual}, but the "
            f"one recorded at export is {recorded}. Do not use it; get the original file, or {REEXPORT[0].lower()}"
            f"{REEXPORT[1:]}"
        )
    return Export(tensors, json.loads(metadata["model_config"]), json.loads(metadata["data_config"]), metadata)


def read_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """An export file as a Lightning-checkpoint-shaped dict: ``state_dict`` (names with DiffusionTask's
    ``model.`` prefix), ``hyper_parameters``, ``datamodule_hyper_parameters`` (absent when the file has no
    data configuration) and ``mulan_base_seed`` (the run's seed, when the export recorded it). Verified as in
    :func:`read_export`."""
    content = read_export(path)
    checkpoint: dict[str, Any] = {
        "state_dict": {MODEL_PREFIX + name: tensor for name, tensor in content.tensors.items()},
        "hyper_parameters": content.model_config,
    }
    if content.data_config is not None:
        checkpoint["datamodule_hyper_parameters"] = content.data_config
    if "seed" in content.metadata:  # the run's seed (evaluation draws are seeded from it), as a checkpoint holds it
        checkpoint["mulan_base_seed"] = int(content.metadata["seed"])
    return checkpoint


# ------------------------------------------------------------------------------------------------ checkpoints
def load_checkpoint(path: str, error: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors for missing, unsafe or corrupted files; a
    safetensors export (:func:`write_export`) is read (and verified) as a checkpoint-shaped dict instead
    (:func:`read_checkpoint_dict`). ``error``, when given, is called with the one-line message first (an argument
    parser's ``error``); then ``ValueError`` is raised with it."""

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
