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
The SHA-256 detects accidental or careless changes; it is not a signature (whoever edits the file can
recompute it), so load files from sources you trust. Loading never unpickles anything.

Nothing here imports Lightning: the model is built from the saved configuration with jsonargparse (the parser
behind LightningCLI) and the component factories of :class:`~mulan.lightning.DiffusionTask`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

__all__ = ["export", "load_model", "read_checkpoint_dict", "read_export", "write_export", "Export"]

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
def build_model(model_config: dict[str, Any], source: str = "the configuration") -> DiffusionModel:
    """The :class:`~mulan.model.DiffusionModel` that :class:`~mulan.lightning.DiffusionTask` builds from these
    saved hyper-parameters (freshly initialised)."""
    from jsonargparse import ArgumentParser

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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
    """The :class:`~mulan.model.DiffusionModel` of an export file, built from its configuration, with its
    weights loaded, on ``device`` and in eval mode. The caller's random state is left as it was."""
    content = read_export(path)
    with torch.random.fork_rng(devices=[]):  # building initialises weights randomly; they are replaced
        model = build_model(content.model_config, str(path))
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
