"""Checkpoint and export files, read without unpickling anything and written so that a change is detected.

Three kinds of file (or directory) hold a trained model:

* a Lightning checkpoint (``.ckpt``, written by ``mulan-cli fit``), read by :func:`load_checkpoint` with
  ``torch.load(weights_only=True)``: tensors and plain containers only;
* a mulan export (``.safetensors``, written by :func:`write_export` through ``python -m mulan.export``): the
  :class:`~mulan.model.DiffusionModel`'s tensors (names as in its ``state_dict``), and the metadata (safetensors'
  string-to-string header) ``model_config`` and ``data_config`` (the JSON of the checkpoint's ``hyper_parameters``
  and ``datamodule_hyper_parameters``) and ``sha256`` (:func:`digest`, of the tensors and every other entry).
  :func:`read_export` refuses a file whose SHA-256 does not match: it detects accidental or careless changes, but it
  is not a signature (whoever edits the file can recompute it);
* a pretrained directory (written by :func:`write_pretrained` through ``mulan.export.save_pretrained``), the layout
  of Hugging Face's ``save_pretrained``: ``config.json`` (readable JSON: the format, the image shape, which weights,
  the step, the seed, the stored dtype, any metrics, ``model_config``, ``data_config`` and ``sha256``, the SHA-256 of
  the tensors and of everything else in the file) and ``model.safetensors`` (the tensors, metadata
  ``{"format": "pt"}``). :func:`read_pretrained` refuses a directory whose ``config.json`` or weights changed after
  saving (again: not a signature). The model card ``README.md`` beside them is written by :mod:`mulan.export` and
  is not covered.

Building a model from an export, and writing one from a checkpoint, is :mod:`mulan.export`'s part. This module
imports only torch and safetensors (no Lightning, no other mulan module).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

__all__ = [
    "Export",
    "digest",
    "is_pretrained",
    "is_safetensors",
    "load_checkpoint",
    "read_checkpoint_dict",
    "read_export",
    "read_pretrained",
    "read_saved",
    "write_export",
    "write_pretrained",
]

FORMAT = "mulan-export"
FORMAT_VERSION = 1
MODEL_PREFIX = "model."
"""Where :class:`~mulan.lightning.DiffusionTask` keeps its :class:`~mulan.model.DiffusionModel`."""
REEXPORT = "Export the checkpoint again: python -m mulan.export CHECKPOINT.ckpt OUT.safetensors."
PRETRAINED_FORMAT = "mulan-pretrained"
PRETRAINED_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
"""The files of a pretrained directory (the names Hugging Face's ``save_pretrained`` uses)."""
RESAVE = "Save it again: python -m mulan.export CHECKPOINT.ckpt DIR."


@dataclass
class Export:
    """The content of an export file: ``tensors`` (the DiffusionModel's state dict), ``model_config`` and
    ``data_config`` (the saved hyper-parameters; ``data_config`` may be None) and the raw ``metadata``."""

    tensors: dict[str, Tensor]
    model_config: dict[str, Any]
    data_config: dict[str, Any] | None
    metadata: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    """The whole ``config.json`` of a pretrained directory (empty for an export file)."""


# ------------------------------------------------------------------------------------------------ export format
def is_safetensors(path: str | Path) -> bool:
    """True for what mulan reads as safetensors rather than as a Lightning checkpoint: a ``.safetensors`` name, a
    file whose first bytes are a safetensors header (a little-endian 8-byte header length, then ``{``), or a
    pretrained directory (:func:`is_pretrained`)."""
    if Path(path).suffix.lower() == ".safetensors" or is_pretrained(path):
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


# ------------------------------------------------------------------------------------------------ pretrained dirs
def is_pretrained(path: str | Path) -> bool:
    """True for a directory holding ``config.json`` and ``model.safetensors`` (a pretrained directory)."""
    folder = Path(path)
    return folder.is_dir() and (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def pretrained_digests(tensors: dict[str, Tensor], config: dict[str, Any]) -> tuple[str, str]:
    """``(sha256, weights_sha256)``: the SHA-256 (:func:`digest`) of the tensors and of ``config`` (as sorted JSON,
    without its ``sha256`` and ``weights_sha256`` entries), and that of the tensors alone."""
    rest = {key: value for key, value in config.items() if key not in ("sha256", "weights_sha256")}
    return digest(tensors, {"config": json.dumps(rest, sort_keys=True)}), digest(tensors, {})


def write_pretrained(tensors: dict[str, Tensor], config: dict[str, Any], out: str | Path) -> Path:
    """Write a pretrained directory ``out`` (created if missing; other files in it are left alone):
    ``model.safetensors`` (``tensors`` as given, in their dtypes) and ``config.json`` (``format``,
    ``format_version``, then ``config``, then the SHA-256s). Returns ``out``.

    Raises:
        ValueError: ``config`` is not plain JSON (class paths and init args), or ``out`` is a file.
    """
    from safetensors.torch import save_file

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{out} is a file; save_pretrained writes a directory: give a path that is a folder or new.")
    plain = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}
    full = {"format": PRETRAINED_FORMAT, "format_version": PRETRAINED_VERSION, **config}
    try:
        full["sha256"], full["weights_sha256"] = pretrained_digests(plain, full)
        text = json.dumps(full, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"the configuration cannot be written as JSON ({error}): save_pretrained needs the plain configuration "
            "that mulan-cli fit saves (class paths and init args) and finite numbers, not Python objects."
        ) from error
    folder.mkdir(parents=True, exist_ok=True)
    save_file(plain, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
    return folder


def read_pretrained(path: str | Path) -> Export:
    """Read and verify a pretrained directory: the format of ``config.json``, then the SHA-256 of its tensors and
    configuration. ``metadata`` holds the entries an export file would (``weights``, ``global_step``, ``seed``,
    ``source``, as strings), ``config`` the whole ``config.json``.

    Raises:
        FileNotFoundError: not a directory with ``config.json`` and ``model.safetensors``.
        ValueError: unreadable, not mulan's, written by a newer mulan, or changed after saving; one line each.
    """
    from safetensors import safe_open

    folder = Path(path)
    if not is_pretrained(folder):
        raise FileNotFoundError(
            f"{path}: not a pretrained directory (it needs {CONFIG_NAME} and {WEIGHTS_NAME}, as written by "
            "mulan.export.save_pretrained or python -m mulan.export CHECKPOINT DIR)."
        )
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON ({error}). {RESAVE}") from error
    if not isinstance(config, dict) or config.get("format") != PRETRAINED_FORMAT:
        raise ValueError(
            f'{folder / CONFIG_NAME} is not a mulan model\'s configuration (no "format": "{PRETRAINED_FORMAT}"), '
            f"so the model cannot be rebuilt from it. {RESAVE}"
        )
    version = config.get("format_version")
    if not isinstance(version, int) or version > PRETRAINED_VERSION:
        raise ValueError(
            f"{path} was written by a newer mulan (pretrained format {version}; this one reads up to "
            f"{PRETRAINED_VERSION}). Upgrade mulan to load it."
        )
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise ValueError(
            f"{folder / WEIGHTS_NAME} cannot be read: it is truncated or corrupted ({type(error).__name__}: {error}). "
            f"{RESAVE}"
        ) from error
    actual, weights_actual = pretrained_digests(tensors, config)
    if config.get("sha256") != actual:
        changed = WEIGHTS_NAME if config.get("weights_sha256") != weights_actual else CONFIG_NAME
        raise ValueError(
            f"{path} was modified after saving: its {changed} changed (the SHA-256 of the tensors and configuration is "
            f"{actual}, the one recorded when saving is {config.get('sha256')}). Do not use it; get the original "
            f"directory, or {RESAVE[0].lower()}{RESAVE[1:]}"
        )
    metadata = {"format": PRETRAINED_FORMAT, "format_version": str(version), "sha256": actual}
    for key in ("weights", "global_step", "seed", "source"):
        if config.get(key) is not None:
            metadata[key] = str(config[key])
    return Export(tensors, config.get("model_config") or {}, config.get("data_config"), metadata, config)


def read_saved(path: str | Path) -> Export:
    """A pretrained directory (:func:`read_pretrained`) or an export file (:func:`read_export`), verified."""
    return read_pretrained(path) if Path(path).is_dir() else read_export(path)


def read_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """An export file or a pretrained directory as a Lightning-checkpoint-shaped dict: ``state_dict`` (names with
    DiffusionTask's ``model.`` prefix), ``hyper_parameters``, ``datamodule_hyper_parameters`` (absent when the file
    has no data configuration) and ``mulan_base_seed`` (the run's seed, when the export recorded it). Verified as
    in :func:`read_saved`."""
    content = read_saved(path)
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
    (:func:`read_checkpoint_dict`), and so is a pretrained directory (:func:`read_pretrained`). ``error``, when
    given, is called with the one-line message first (an argument parser's ``error``); then ``ValueError`` is
    raised with it."""

    def fail(message: str) -> NoReturn:
        if error is not None:
            error(message)
        raise ValueError(message)

    file = Path(path)
    if file.is_dir() and not is_pretrained(file):
        fail(
            f"checkpoint {path!r} is a directory without {CONFIG_NAME} and {WEIGHTS_NAME}; give the path of a .ckpt "
            "file inside it (written by mulan-cli fit), or a directory written by mulan.export.save_pretrained."
        )
    if not file.exists():
        fail(
            f"checkpoint {path!r} does not exist (give the path of a .ckpt file written by `mulan-cli fit`, or of a "
            ".safetensors file or directory written by `python -m mulan.export`)."
        )
    if is_safetensors(file):
        try:
            return read_checkpoint_dict(file)
        except (ValueError, FileNotFoundError) as exc:
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
