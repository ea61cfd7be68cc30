"""Shareable models: a trained model's weights and its resolved configuration in one safetensors file.

    python -m mulan.export runs/demo_mulan/version_0/checkpoints/last.ckpt demo.safetensors

    model = mulan.export.load_model("demo.safetensors")      # a DiffusionModel, weights loaded, in eval mode
    mulan-cli test --ckpt_path demo.safetensors                # model and data rebuilt from the file

What the file holds:

* the tensors of the :class:`~mulan.model.DiffusionModel` (names as in its ``state_dict``, without the
  ``model.`` prefix of :class:`~mulan.lightning.DiffusionTask`). From a checkpoint written with Lightning's
  ``EMAWeightAveraging`` these are the averaged (EMA) weights: that callback stores the average under the
  checkpoint's ``state_dict`` key and the raw weights under ``current_model_state``, and export reads
  ``state_dict``. The metadata key ``weights`` says which (``"ema"`` or ``"raw"``);
* the metadata (safetensors' string-to-string header): ``model_config`` and ``data_config``, the JSON of the
  checkpoint's ``hyper_parameters`` and ``datamodule_hyper_parameters`` as saved by ``mulan-cli fit`` (class
  paths and every init argument), and ``sha256``, the SHA-256 of the tensors (name, dtype, shape, bytes) and of
  every other metadata entry.

Reading checks the SHA-256 (a file changed after export is refused) and, when a model is built, that the
configuration's model has exactly the file's tensors (missing, unexpected and wrong-shape tensors are named).
The SHA-256 detects accidental or careless changes; it is **not a signature**: whoever edits the file can
recompute it, so it proves nothing about who wrote the file. Loading never unpickles anything.

What loading may build is limited (:func:`check_class_paths`, applied before anything is imported): every class
path in the file's configuration must be one of mulan's own classes (a class *defined* in a ``mulan`` module,
checked from mulan's source without importing anything), a torch optimiser or learning-rate scheduler
(``torch.optim...``), Lightning's ``ReduceLROnPlateau`` and instantiator, or a class the user trusts by name:
``load_model(..., trusted=["mypackage.MyDenoiser"])`` (or a module prefix ending in ``.``:
``trusted=["mypackage."]``), ``mulan-cli test --trusted_classes ...``, or the environment variable
``MULAN_TRUSTED_CLASSES`` (comma-separated, same forms). Anything else is refused in one line that names the
class, without importing its module.

Nothing here imports Lightning: the model is built from the saved configuration with jsonargparse (the parser
behind LightningCLI) and the component factories of :class:`~mulan.lightning.DiffusionTask`.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mulan.latents import LatentFactory
from mulan.model import DiffusionModel
from mulan.model import build_model as build_components
from mulan.networks import DenoiserFactory
from mulan.parameterisation import ParameterisationFactory
from mulan.processes.base import ProcessFactory
from mulan.time_sampling import TimeSamplerFactory

__all__ = [
    "export",
    "load_model",
    "build_model",
    "check_class_paths",
    "read_checkpoint_dict",
    "read_export",
    "write_export",
    "Export",
]

FORMAT = "mulan-export"
FORMAT_VERSION = 1
MODEL_PREFIX = "model."
"""Where :class:`~mulan.lightning.DiffusionTask` keeps its :class:`~mulan.model.DiffusionModel`."""
FACTORIES: dict[str, Any] = {
    "denoiser": DenoiserFactory,
    "process": ProcessFactory,
    "latent": LatentFactory,
    "parameterisation": ParameterisationFactory,
    "time_sampler": TimeSamplerFactory,
}
"""The component arguments of DiffusionTask and their types (factories), as LightningCLI parses them."""
MODEL_OPTIONS = ("image_shape", *FACTORIES, "timesteps", "channels_last")
"""The saved options that determine the DiffusionModel."""
REEXPORT = "Export the checkpoint again: python -m mulan.export CHECKPOINT.ckpt OUT.safetensors."


@dataclass
class Export:
    """The content of an export file: ``tensors`` (the DiffusionModel's state dict), ``model_config`` and
    ``data_config`` (the saved hyper-parameters; ``data_config`` may be None) and the raw ``metadata``."""

    tensors: dict[str, Tensor]
    model_config: dict[str, Any]
    data_config: dict[str, Any] | None
    metadata: dict[str, str]


# ------------------------------------------------------------------------------------------------ format
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
    ``model.`` prefix), ``hyper_parameters`` and ``datamodule_hyper_parameters`` (absent when the file has no
    data configuration). Verified as in :func:`read_export`."""
    content = read_export(path)
    checkpoint: dict[str, Any] = {
        "state_dict": {MODEL_PREFIX + name: tensor for name, tensor in content.tensors.items()},
        "hyper_parameters": content.model_config,
    }
    if content.data_config is not None:
        checkpoint["datamodule_hyper_parameters"] = content.data_config
    return checkpoint


# ------------------------------------------------------------------------------------------------ allowed classes
TRUSTED_ENV = "MULAN_TRUSTED_CLASSES"
"""Environment variable: comma-separated class paths (``pkg.mod.Class``) or module prefixes (``pkg.``) that
loading may instantiate besides mulan's own classes."""
IMPORT_PATH_KEYS = ("class_path", "_class_path", "_instantiator")
"""Keys whose string value jsonargparse or Lightning imports: ``class_path`` (a component), ``_class_path``
(the saved module or data module) and ``_instantiator`` (the function Lightning calls to build them)."""
LIGHTNING_ALLOWED = frozenset({"lightning.pytorch.cli.ReduceLROnPlateau", "lightning.pytorch.cli.instantiate_module"})
"""Lightning objects that configurations saved by ``mulan-cli fit`` may name (exact paths)."""
TORCH_OPTIM = "torch.optim"


def _trusted_entries(trusted: Iterable[str]) -> list[str]:
    """The user's trusted entries (``trusted`` and :data:`TRUSTED_ENV`), validated: each a dotted path of Python
    identifiers, optionally ending in ``.`` (a module prefix)."""
    entries = [str(entry).strip() for entry in trusted]
    entries += [entry.strip() for entry in os.environ.get(TRUSTED_ENV, "").split(",")]
    entries = [entry for entry in entries if entry]
    for entry in entries:
        if not all(part.isidentifier() for part in entry.removesuffix(".").split(".")):
            raise ValueError(
                f"trusted class entry {entry!r} (from trusted= or {TRUSTED_ENV}) is not a class path such as "
                "'mypackage.models.MyDenoiser' nor a module prefix such as 'mypackage.': fix or remove it."
            )
    return entries


def _is_trusted(path: str, entries: list[str]) -> bool:
    """``path`` equals an entry, or starts with an entry that ends in ``.`` (so ``pkg.`` never matches ``pkgx``)."""
    return any(path == entry or (entry.endswith(".") and path.startswith(entry)) for entry in entries)


def _mulan_source(module: list[str]) -> Path | None:
    """The source file of the mulan module ``module`` (its dotted parts, ``mulan`` first), or None; nothing is
    imported."""
    base = Path(__file__).resolve().parent  # the mulan package
    for part in module[1:]:
        base = base / part
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file() and len(module) > 1:
        return base.with_suffix(".py")
    return None


@functools.lru_cache(maxsize=64)
def _parse(source: Path) -> ast.Module:
    """The syntax tree of one of mulan's source files (read once)."""
    return ast.parse(source.read_text(encoding="utf-8"), filename=str(source))


def _defined_in_mulan(path: str, depth: int = 0) -> bool:
    """Whether ``path`` (``mulan.<module>.<Name>``) names a class defined in mulan's source: ``<Name>`` is a
    ``class`` statement at the top level of that module, or is imported there from a mulan module where it is
    (followed to its definition). Read from the source with :mod:`ast`, so nothing is imported or run; paths
    that reach an attribute of a class, a module, a function or anything imported from elsewhere are not."""
    parts = path.split(".")
    if depth > 8 or len(parts) < 2 or parts[0] != "mulan" or any(p.startswith("__") for p in parts):
        return False
    source = _mulan_source(parts[:-1])
    if source is None:
        return False
    name, package = parts[-1], parts[:-1] if source.name == "__init__.py" else parts[:-2]
    binding: tuple[str, str] | None = None  # the last top-level statement that binds `name`
    for node in _parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            binding = ("class", "")
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    if node.level:  # relative import: from the package `level - 1` levels above this one
                        anchor = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                        origin = ".".join([*anchor, *([node.module] if node.module else [])])
                    else:
                        origin = node.module or ""
                    binding = ("import", f"{origin}.{alias.name}")
        elif isinstance(node, ast.Import | ast.Assign | ast.AnnAssign | ast.FunctionDef | ast.AsyncFunctionDef):
            targets = _bound_names(node)
            if name in targets:
                binding = ("other", "")
    if binding is None or binding[0] == "other":
        return False
    if binding[0] == "import":
        return _defined_in_mulan(binding[1], depth + 1)
    loaded = sys.modules.get(".".join(parts[:-1]))  # also check the live object when its module is loaded already
    if loaded is not None:
        obj = vars(loaded).get(name)
        return inspect.isclass(obj) and (obj.__module__ == "mulan" or obj.__module__.startswith("mulan."))
    return True


def _bound_names(node: ast.stmt) -> set[str]:
    """The names a top-level ``import``, assignment or ``def`` binds."""
    if isinstance(node, ast.Import):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]  # type: ignore[attr-defined]
    return {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}


def _torch_optim_class(path: str) -> bool:
    """Whether ``path`` names a torch optimiser or learning-rate scheduler class in an already imported
    ``torch.optim`` module (``torch.optim.Adam``, ``torch.optim.lr_scheduler.CosineAnnealingLR``)."""
    module_name, _, name = path.rpartition(".")
    if not (module_name == TORCH_OPTIM or module_name.startswith(TORCH_OPTIM + ".")):
        return False
    module = sys.modules.get(module_name)  # torch is imported by mulan; nothing new is imported here
    obj = vars(module).get(name) if module is not None else None
    bases = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return inspect.isclass(obj) and issubclass(obj, bases) and obj.__module__.startswith(TORCH_OPTIM + ".")


def _is_import_path(value: str) -> bool:
    """Whether jsonargparse could take the string ``value`` for an import path: two or more dotted identifiers
    whose first names an importable top-level module (found without importing it)."""
    parts = value.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        return False
    try:
        return parts[0] in sys.modules or importlib.util.find_spec(parts[0]) is not None
    except (ImportError, ValueError):
        return True


def _allowed(path: str, entries: list[str]) -> bool:
    return (
        _is_trusted(path, entries) or path in LIGHTNING_ALLOWED or _defined_in_mulan(path) or _torch_optim_class(path)
    )


def check_class_paths(config: Any, source: str, trusted: Iterable[str] = ()) -> None:
    """Refuse a saved configuration that names a class loading should not build, before anything is imported.

    Walks ``config`` (nested dicts and lists) for the values of ``class_path``, ``_class_path`` and
    ``_instantiator``, and for any other string that jsonargparse would take for an import path (such as
    ``"denoiser": "pkg.mod.factory"``). Each must be: a class defined in mulan (``mulan.UNet``,
    ``mulan.lightning.optim.AdamW``; a ``mulan.`` path that reaches anything else, such as a module mulan imports,
    is refused); a torch optimiser or scheduler class (``torch.optim.Adam``); Lightning's ``ReduceLROnPlateau``
    or ``instantiate_module``; or trusted by the user: an entry of ``trusted`` or of the environment variable
    ``MULAN_TRUSTED_CLASSES`` (comma-separated) that equals it, or that ends in ``.`` and begins it.

    Raises:
        ValueError: one line naming the first refused path, where it is in the configuration, ``source`` (the
            file it came from) and how to allow it; also for a malformed trusted entry.
    """
    entries = _trusted_entries(trusted)

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                place = f"{where}.{key}" if where else str(key)
                if key in IMPORT_PATH_KEYS and not isinstance(item, str):
                    raise ValueError(
                        f"{source}: {place} must be a class path string, got {type(item).__name__}; the file's "
                        f"configuration is not one that mulan-cli fit saves. {REEXPORT}"
                    )
                walk(item, place)
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")
        elif isinstance(value, str) and (where.rsplit(".", 1)[-1] in IMPORT_PATH_KEYS or _is_import_path(value)):
            if not _allowed(value, entries):
                raise ValueError(
                    f"{source}: refusing to import {value!r} (at {where}): loading builds only mulan's own classes, "
                    f"torch optimisers/schedulers and classes you trust. If you trust this file, allow it with "
                    f"load_model(..., trusted=[{value!r}]), mulan-cli --trusted_classes {value} or "
                    f"{TRUSTED_ENV}={value}."
                )

    walk(config, "")


# ------------------------------------------------------------------------------------------------ export
def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the weights of a checkpoint of ``mulan-cli fit`` (the EMA average when the run used
    ``EMAWeightAveraging``) and its model and data configuration to the safetensors file ``out``."""
    from mulan.lightning.checkpoint_io import load_checkpoint  # the safe loader (imports Lightning)

    saved = load_checkpoint(str(checkpoint))
    model_config = dict(saved.get("hyper_parameters") or {})
    if "_class_path" not in model_config:
        raise ValueError(
            f"checkpoint {checkpoint} holds no saved model configuration (its hyper_parameters have no "
            "'_class_path'), so the model could not be rebuilt from an export. Export checkpoints written by "
            "mulan-cli fit."
        )
    state = saved["state_dict"]
    foreign = sorted(name for name in state if not name.startswith(MODEL_PREFIX))
    if foreign:
        raise ValueError(
            f"checkpoint {checkpoint} has weights outside the diffusion model ({', '.join(foreign[:5])}): export "
            "supports DiffusionTask checkpoints, whose weights all live under 'model.'."
        )
    tensors = {name.removeprefix(MODEL_PREFIX): tensor for name, tensor in state.items()}
    weights = "ema" if "current_model_state" in saved else "raw"
    return write_export(
        tensors,
        model_config,
        saved.get("datamodule_hyper_parameters"),
        out,
        weights=weights,
        global_step=str(saved.get("global_step", "")),
        source=Path(checkpoint).name,
    )


# ------------------------------------------------------------------------------------------------ load
def build_model(
    model_config: dict[str, Any], source: str = "the configuration", trusted: Iterable[str] = ()
) -> DiffusionModel:
    """The :class:`~mulan.model.DiffusionModel` that :class:`~mulan.lightning.DiffusionTask` builds from these
    saved hyper-parameters (freshly initialised). Only allowed classes are built (:func:`check_class_paths`, with
    ``trusted``); anything else is refused before it is imported."""
    from jsonargparse import ArgumentParser

    check_class_paths(model_config, source, trusted)
    missing = [name for name in MODEL_OPTIONS if name not in model_config]
    if missing:
        raise ValueError(f"{source} lacks the model options {', '.join(missing)}. {REEXPORT}")
    parser = ArgumentParser(exit_on_error=False)
    for name, factory_type in FACTORIES.items():
        parser.add_argument(f"--{name}", type=factory_type)
    try:
        parsed = parser.parse_object({name: model_config[name] for name in FACTORIES})
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        factories = instantiate(parsed)
    except Exception as error:  # jsonargparse: unknown class path or option
        raise ValueError(f"{source}: the model configuration cannot be built ({error}). {REEXPORT}") from error
    return build_components(
        model_config["image_shape"],
        factories.denoiser,
        factories.process,
        factories.latent,
        factories.parameterisation,
        factories.time_sampler,
        int(model_config["timesteps"]),
        bool(model_config["channels_last"]),
    )


def check_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str, why: str) -> None:
    """Refuse ``tensors`` unless they are exactly ``model``'s state dict by name and shape, naming the missing,
    unexpected and wrong-shape tensors; ``why`` says where ``model`` came from."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{name} {tuple(tensors[name].shape)} in the file vs {tuple(expected[name].shape)} in the model"
        for name in sorted(set(expected) & set(tensors))
        if tensors[name].shape != expected[name].shape
    ]
    problems = [
        f"{label} ({len(names)}): {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if names
    ]
    if problems:
        raise ValueError(f"{source}: {why} does not match the file's tensors: " + "; ".join(problems) + ".")


def load_model(path: str | Path, device: str | torch.device = "cpu", trusted: Iterable[str] = ()) -> DiffusionModel:
    """The :class:`~mulan.model.DiffusionModel` of an export file, built from its configuration, with its
    weights loaded, on ``device`` and in eval mode. The caller's random state is left as it was.

    Only mulan's own classes (and torch optimisers) are built from the file, plus the classes named in ``trusted``
    or in the environment variable ``MULAN_TRUSTED_CLASSES`` (class paths, or module prefixes ending in ``.``,
    e.g. ``trusted=["mypackage.MyDenoiser"]``): see :func:`check_class_paths`. Anything else is refused, in one
    line, before its module is imported."""
    content = read_export(path)
    with torch.random.fork_rng(devices=[]):  # building initialises weights randomly; they are replaced
        model = build_model(content.model_config, str(path), trusted)
    check_tensors(model, content.tensors, str(path), "the model its configuration describes")
    model.load_state_dict(content.tensors)
    return model.to(device).eval()


def load_into_task(task: Any, path: str | Path) -> None:
    """Load the weights of an export file into a DiffusionTask (``task.model``), refusing a task built for
    another image shape or another model (used by ``mulan-cli test/validate/predict --ckpt_path X.safetensors``)."""
    content = read_export(path)
    saved = tuple(int(s) for s in content.model_config.get("image_shape", ()))
    ours = tuple(int(s) for s in task.hparams["image_shape"])
    if saved and saved != ours:
        raise ValueError(
            f"{path} was trained on images of shape {saved} (C, H, W), but the data given now has shape {ours}. "
            "Evaluate it on data of that shape: with mulan-cli, leave out --data so the data configuration saved in "
            "the file is used."
        )
    check_tensors(task.model, content.tensors, str(path), "the model given now")
    task.model.load_state_dict(content.tensors)


# ------------------------------------------------------------------------------------------------ script
def main(argv: list[str] | None = None) -> Path:
    """``python -m mulan.export CHECKPOINT OUT``: export and print what was written."""
    parser = argparse.ArgumentParser(
        prog="python -m mulan.export",
        description="Export the (EMA) weights and the configuration of a mulan-cli checkpoint to safetensors.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by mulan-cli fit")
    parser.add_argument("out", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out)
    content = read_export(out)
    parameters = sum(t.numel() for t in content.tensors.values())
    weights = {"ema": "EMA (EMAWeightAveraging average)", "raw": "raw (the run had no weight averaging)"}
    print(
        f"wrote {out}: {len(content.tensors)} tensors, {parameters:,} values, {weights[content.metadata['weights']]} "
        f"weights of {content.model_config['_class_path']} at step {content.metadata['global_step']}; data: "
        f"{(content.data_config or {}).get('_class_path', 'none saved')}.\n"
        f"Load it with mulan.export.load_model({str(out)!r}), or evaluate it with "
        f"mulan-cli test --ckpt_path {out}"
    )
    return out


if __name__ == "__main__":
    main()
