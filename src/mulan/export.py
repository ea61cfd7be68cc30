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
  paths and every init argument), ``global_step``, ``seed`` (the run's seed, from which evaluation draws are
  seeded, so that ``mulan-cli test`` on the export prints the checkpoint's figures), and ``sha256``, the SHA-256 of
  the tensors (name, dtype, shape, bytes) and of every other metadata entry.

Reading checks the SHA-256 (a file changed after export is refused) and, when a model is built, that the
configuration's model has exactly the file's tensors (missing, unexpected and wrong-shape tensors are named).
The SHA-256 detects accidental or careless changes; it is **not a signature**: whoever edits the file can
recompute it, so it proves nothing about who wrote the file. Loading never unpickles anything.

What loading may build is limited (:func:`~mulan.trusted.check_class_paths`, applied before anything is
imported): every class path in the file's configuration must be one of mulan's own classes (a class *defined* in a
``mulan`` module, checked from mulan's source without importing anything), a torch optimiser or learning-rate
scheduler (``torch.optim...``), Lightning's ``ReduceLROnPlateau`` and instantiator, or a class the user trusts by
name: ``load_model(..., trusted=["mypackage.MyDenoiser"])`` (or a module prefix ending in ``.``:
``trusted=["mypackage."]``), ``mulan-cli test --trusted_classes ...``, or the environment variable
``MULAN_TRUSTED_CLASSES`` (comma-separated, same forms). Anything else is refused in one line that names the
class, without importing its module.

Nothing here imports Lightning: the model is built from the saved configuration with jsonargparse (the parser
behind LightningCLI) and the component factories of :class:`~mulan.lightning.DiffusionTask`. The file format (and
the safe checkpoint reader) lives in :mod:`mulan.checkpoints`, the class allowlist in :mod:`mulan.trusted`; both are
re-exported here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mulan.checkpoints import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_PREFIX,
    REEXPORT,
    Export,
    digest,
    is_safetensors,
    load_checkpoint,
    read_checkpoint_dict,
    read_export,
    write_export,
)
from mulan.latents import LatentFactory
from mulan.model import DiffusionModel
from mulan.model import build_model as build_components
from mulan.networks import DenoiserFactory
from mulan.parameterisation import ParameterisationFactory
from mulan.processes.base import ProcessFactory
from mulan.time_sampling import TimeSamplerFactory
from mulan.trusted import TRUSTED_ENV, check_class_paths

__all__ = [
    "export",
    "load_model",
    "build_model",
    "load_into_task",
    # re-exported: the file format (mulan.checkpoints) and the class allowlist (mulan.trusted) lived here
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_PREFIX",
    "TRUSTED_ENV",
    "Export",
    "check_class_paths",
    "digest",
    "is_safetensors",
    "read_checkpoint_dict",
    "read_export",
    "write_export",
]

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


# ------------------------------------------------------------------------------------------------ export
def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the weights of a checkpoint of ``mulan-cli fit`` (the EMA average when the run used
    ``EMAWeightAveraging``) and its model and data configuration to the safetensors file ``out``."""
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
        **({"seed": str(saved["mulan_base_seed"])} if "mulan_base_seed" in saved else {}),
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
    if "seed" in content.metadata:  # the run's seed, from which evaluation draws are seeded (as from a checkpoint)
        task.on_load_checkpoint({"mulan_base_seed": int(content.metadata["seed"])})


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
