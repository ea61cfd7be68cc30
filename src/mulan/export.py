"""Shareable models: a trained model's weights and its resolved configuration, as a directory in the layout of
Hugging Face's ``save_pretrained`` or as one safetensors file.

    python -m mulan.export runs/demo_mulan/version_0/checkpoints/last.ckpt demo-mulan           # a directory
    python -m mulan.export runs/demo_mulan/version_0/checkpoints/last.ckpt demo.safetensors     # one file

    model = mulan.export.from_pretrained("demo-mulan")     # a DiffusionModel, weights loaded, eval mode, .config
    model = mulan.export.load_model("demo.safetensors")      # the same from the file (or from a directory)
    mulan-cli test --ckpt_path demo-mulan                    # model and data rebuilt from config.json

The directory (:func:`save_pretrained`, :func:`from_pretrained`) holds ``config.json`` (readable JSON: the model
and data configuration as saved by ``mulan-cli fit``, image shape, weights ``ema``/``raw``, step, seed, stored
dtype, metrics, SHA-256), ``model.safetensors`` (the tensors) and a model card ``README.md`` (:func:`model_card`:
data, steps, seed, the bound with its standard error when recorded, and the command that evaluates it). The format
of both forms lives in :mod:`mulan.checkpoints`; docs: sharing.

What the single file holds:

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
import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mulan.checkpoints import (
    CARD_NAME,
    FORMAT,
    FORMAT_VERSION,
    MODEL_PREFIX,
    REEXPORT,
    Export,
    digest,
    is_pretrained,
    is_safetensors,
    load_checkpoint,
    read_checkpoint_dict,
    read_export,
    read_pretrained,
    read_saved,
    write_export,
    write_pretrained,
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
    "save_pretrained",
    "from_pretrained",
    "model_card",
    "read_metrics",
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
    "is_pretrained",
    "is_safetensors",
    "read_checkpoint_dict",
    "read_export",
    "read_pretrained",
    "write_export",
    "write_pretrained",
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
def _from_checkpoint(checkpoint: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], Any, dict[str, Any]]:
    """``(tensors, model_config, data_config, info)`` of a checkpoint of ``mulan-cli fit``: the DiffusionModel's
    tensors (the EMA average when the run used ``EMAWeightAveraging``), the saved hyper-parameters, and ``weights``,
    ``global_step``, ``seed`` (None when not recorded), ``source`` and ``metrics`` (the monitored score of the
    run's ModelCheckpoint when this checkpoint was saved, if any)."""
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
    metrics = {}
    for key, value in (saved.get("callbacks") or {}).items():  # ModelCheckpoint's monitored value at this save
        if key.startswith("ModelCheckpoint") and isinstance(value, dict) and value.get("monitor"):
            score = value.get("current_score")
            if isinstance(score, Tensor | float | int) and math.isfinite(float(score)):
                metrics[str(value["monitor"])] = float(score)
    info = {
        "weights": "ema" if "current_model_state" in saved else "raw",
        "global_step": saved.get("global_step"),
        "seed": saved.get("mulan_base_seed"),
        "source": Path(checkpoint).name,
        "metrics": metrics,
    }
    return tensors, model_config, saved.get("datamodule_hyper_parameters"), info


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the weights of a checkpoint of ``mulan-cli fit`` (the EMA average when the run used
    ``EMAWeightAveraging``) and its model and data configuration to the safetensors file ``out``."""
    tensors, model_config, data_config, info = _from_checkpoint(checkpoint)
    return write_export(
        tensors,
        model_config,
        data_config,
        out,
        weights=info["weights"],
        global_step=str(info["global_step"] if info["global_step"] is not None else ""),
        source=info["source"],
        **({"seed": str(info["seed"])} if info["seed"] is not None else {}),
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
    if Path(path).is_dir():
        return from_pretrained(path, device, trusted=trusted)
    return _build_and_load(read_export(path), str(path), device, trusted)


def _build_and_load(content: Export, source: str, device: str | torch.device, trusted: Iterable[str]) -> DiffusionModel:
    """The model ``content`` describes, its tensors loaded (widened to the model's float32 where stored lower), on
    ``device``, in eval mode, with ``.config`` (:func:`_config_of`)."""
    with torch.random.fork_rng(devices=[]):  # building initialises weights randomly; they are replaced
        model = build_model(content.model_config, source, trusted)
    check_tensors(model, content.tensors, source, "the model its configuration describes")
    model.load_state_dict(content.tensors)
    model.config = _config_of(content)  # type: ignore[assignment]  # nn.Module.__setattr__ keeps plain values
    return model.to(device).eval()


def load_into_task(task: Any, path: str | Path) -> None:
    """Load the weights of an export file or a pretrained directory into a DiffusionTask (``task.model``), refusing
    a task built for another image shape or another model (used by ``mulan-cli test/validate/predict --ckpt_path
    X.safetensors`` and ``--ckpt_path DIR``)."""
    content = read_saved(path)
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


# ------------------------------------------------------------------------------------------------ pretrained
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""What ``save_pretrained(..., dtype=)`` may store the denoiser's weights in; every other tensor stays float32."""
INTERNAL_KEYS = ("format", "format_version", "sha256", "weights_sha256")
"""Entries of ``config.json`` that describe the file rather than the model (left out of ``model.config``)."""
KNOWN_DATASETS = {"CIFAR10DataModule": "cifar10", "MNISTDataModule": "mnist"}
"""Data modules whose data set has a Hugging Face Hub id (the card's ``datasets:``)."""
CARD_TAGS = ("mulan", "diffusion", "likelihood", "image-generation")
LOW_PRECISION_LOAD = (
    "from_pretrained keeps the model's parameters in float32: the schedule, the Fourier features, the decoder and "
    "the loss must stay float32 (docs: math, section 8), and a denoiser with {dtype} weights would have its input "
    "x_t rounded to {dtype} before the Fourier features. Run the U-Net body in {dtype} with torch.autocast("
    "device_type, dtype=torch.{dtype}) around the call (as precision: bf16-mixed does), and store smaller files "
    "with save_pretrained(..., dtype=torch.{dtype})."
)


def _dtype_name(dtype: torch.dtype | str) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` for a torch dtype or its name; anything else is refused."""
    name = str(dtype).removeprefix("torch.")
    if name not in STORAGE_DTYPES:
        raise ValueError(
            f"dtype {dtype} is not supported: give torch.float32, torch.bfloat16 or torch.float16 (only the "
            "denoiser's weights are stored lower; the schedule, latent and decoder stay float32)."
        )
    return name


def _stored(tensors: Mapping[str, Tensor], dtype: str) -> dict[str, Tensor]:
    """The tensors to store: the denoiser's floating-point tensors (names ``denoiser.*``) in ``dtype``, every other
    floating-point tensor in float32 (docs: math, section 8), the rest (integer buffers) as they are."""
    low = STORAGE_DTYPES[dtype]
    return {
        name: tensor.to(low if name.startswith("denoiser.") else torch.float32)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in tensors.items()
    }


def _checked_metrics(metrics: Mapping[str, Any] | None, source: str = "metrics") -> dict[str, float]:
    """``metrics`` as ``{name: float}``, refusing names that are not strings and values that are not finite
    numbers (one-element tensors are accepted)."""
    checked = {}
    for name, value in (metrics or {}).items():
        try:
            number = float(value.item() if isinstance(value, Tensor) else value)
        except (TypeError, ValueError, RuntimeError):
            number = math.nan
        if not isinstance(name, str) or not math.isfinite(number):
            raise ValueError(
                f"{source}: {name!r} = {value!r} is not a finite number; give metrics as {{name: number}}, e.g. "
                "{'test/bpd': 1.23, 'test/bpd_stderr': 0.01} (what mulan-cli test logs)."
            )
        checked[name] = number
    return checked


def read_metrics(path: str | Path) -> dict[str, float]:
    """Metrics from a JSON object ``{name: number}`` or from a Lightning ``metrics.csv`` (the CSV logger's file:
    the last value logged in each column; ``epoch`` and ``step`` left out)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"metrics file {path} cannot be read ({error.strerror}).") from error
    if file.suffix.lower() == ".csv":
        found: dict[str, Any] = {}
        for row in csv.DictReader(text.splitlines()):
            found.update({k: v for k, v in row.items() if k not in ("epoch", "step") and v not in ("", None)})
        return _checked_metrics(found, str(path))
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"metrics file {path} is not JSON ({error}); give {{name: number}} or a metrics.csv."
        ) from None
    if not isinstance(loaded, dict):
        raise ValueError(f"metrics file {path} holds {type(loaded).__name__}; give a JSON object {{name: number}}.")
    return _checked_metrics(loaded, str(path))


def _config_of(content: Export) -> dict[str, Any]:
    """What ``model.config`` holds: the ``config.json`` of a pretrained directory without its file entries, or the
    same keys built from an export file's metadata."""
    if content.config:
        return {key: value for key, value in content.config.items() if key not in INTERNAL_KEYS}
    meta = content.metadata
    denoiser = next(
        (t for n, t in content.tensors.items() if n.startswith("denoiser.") and t.is_floating_point()), None
    )
    return {
        "library_name": "mulan",
        "image_shape": content.model_config.get("image_shape"),
        "weights": meta.get("weights"),
        "global_step": int(meta["global_step"]) if meta.get("global_step") else None,
        "seed": int(meta["seed"]) if meta.get("seed") else None,
        "source": meta.get("source"),
        "dtype": str(denoiser.dtype).removeprefix("torch.") if denoiser is not None else "float32",
        "metrics": {},
        "model_config": content.model_config,
        "data_config": content.data_config,
    }


def save_pretrained(
    source: str | Path | nn.Module,
    out: str | Path,
    *,
    metrics: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> Path:
    """Write the pretrained directory ``out``: ``config.json``, ``model.safetensors`` and the model card
    ``README.md`` (:func:`model_card`). Returns ``out``.

    Args:
        source: a ``.ckpt`` of ``mulan-cli fit`` (its EMA weights when the run averaged them), an export file or
            pretrained directory (re-saved), or a :class:`~mulan.model.DiffusionModel` loaded by
            :func:`from_pretrained` or :func:`load_model` (its ``.config`` says how to rebuild it; its current
            weights are written). A model built in Python from factories has no such configuration and is refused.
        metrics: figures to record in ``config.json`` and the card, e.g. ``{"test/bpd": 1.23, "test/bpd_stderr":
            0.01}`` (a ``NAME_stderr`` entry is shown as NAME's ±); they update those the source already records.
        dtype: what the denoiser's weights are stored in: ``torch.float32`` (default), ``torch.bfloat16`` or
            ``torch.float16`` (half the file); every other tensor is stored in float32 (docs: math, section 8).
    """
    name = _dtype_name(dtype)
    if isinstance(source, nn.Module):
        base = getattr(source, "config", None)
        if not isinstance(base, dict) or "model_config" not in base:
            raise ValueError(
                f"this {type(source).__name__} has no .config (the saved configuration that rebuilds it), so "
                "from_pretrained could not rebuild it: save the checkpoint of mulan-cli fit instead, "
                "save_pretrained('run/checkpoints/last.ckpt', DIR), or a model loaded by from_pretrained or load_model."
            )
        tensors: Mapping[str, Tensor] = source.state_dict()
        base = dict(base)
    elif is_safetensors(source):
        content = read_saved(source)
        tensors, base = content.tensors, _config_of(content)
    else:
        tensors, model_config, data_config, info = _from_checkpoint(source)
        base = {**info, "model_config": model_config, "data_config": data_config}
    from mulan import __version__

    model_config = base["model_config"]
    config = {
        "library_name": "mulan",
        "mulan_version": __version__,
        "image_shape": model_config.get("image_shape"),
        "weights": base.get("weights"),
        "global_step": base.get("global_step"),
        "seed": base.get("seed"),
        "source": base.get("source"),
        "dtype": name,
        "metrics": {**_checked_metrics(base.get("metrics")), **_checked_metrics(metrics)},
        "model_config": model_config,
        "data_config": base.get("data_config"),
    }
    stored = _stored(tensors, name)
    folder = write_pretrained(stored, config, out)
    (folder / CARD_NAME).write_text(model_card(config, str(out), stored), encoding="utf-8")
    return folder


def from_pretrained(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    trusted: Iterable[str] = (),
) -> DiffusionModel:
    """The :class:`~mulan.model.DiffusionModel` of a pretrained directory (:func:`save_pretrained`), built from its
    ``config.json``, its weights loaded, on ``device``, in eval mode, with ``.config`` (the ``config.json``: the
    model and data configuration, image shape, weights, step, seed, stored dtype, metrics). Weights stored in
    bfloat16 or float16 are widened to float32 exactly; ``dtype`` must be float32 (any other is refused, with how to
    run in bfloat16: autocast). The caller's random state is left as it was.

    The directory's SHA-256 is checked first (a ``config.json`` or ``model.safetensors`` edited after saving is
    refused), then every class path of its model and data configuration (:func:`check_class_paths`, with
    ``trusted`` and ``MULAN_TRUSTED_CLASSES``), before anything is imported."""
    name = _dtype_name(dtype)
    if name != "float32":
        raise ValueError(LOW_PRECISION_LOAD.format(dtype=name))
    content = read_pretrained(path)
    check_class_paths(content.data_config or {}, str(path), trusted)  # both checked before either is built
    return _build_and_load(content, str(path), device, trusted)


def _options(options: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    return ", ".join(
        f"{key}={value!r}" for key, value in options.items() if not key.startswith("_") and key not in skip
    )


def _component(value: Any) -> str:
    """A saved component (``{"class_path", "init_args"}``, or a bare class path) as ``` `path` (options) ```."""
    if isinstance(value, dict) and "class_path" in value:
        options = _options(value.get("init_args") or {})
        return f"`{value['class_path']}`" + (f" ({options})" if options else "")
    return f"`{value}`"


def model_card(config: Mapping[str, Any], location: str, tensors: Mapping[str, Tensor] | None = None) -> str:
    """The ``README.md`` of a pretrained directory: YAML front matter as Hugging Face model cards have it
    (``library_name: mulan``, ``tags``, ``datasets`` when the data set has a Hub id), then the model, the data it was
    trained on, steps and seed, the bound (each ``NAME`` with ``NAME_stderr`` as ``mean ± std. err.``; "not
    evaluated" and the command when nothing is recorded), and the commands that evaluate and load it from
    ``location``."""
    model, data = config.get("model_config") or {}, config.get("data_config") or {}
    data_class = str(data.get("_class_path", ""))
    dataset = KNOWN_DATASETS.get(data_class.rsplit(".", 1)[-1])
    front = ["---", "library_name: mulan", "tags:", *[f"- {tag}" for tag in CARD_TAGS]]
    front += ["datasets:", f"- {dataset}"] if dataset else []
    front += ["---"]
    shape = config.get("image_shape") or model.get("image_shape") or []
    values = sum(t.numel() for t in tensors.values()) if tensors is not None else None
    weights = {"ema": "the EMA average of the weights (EMAWeightAveraging)", "raw": "the raw weights"}
    lines = [
        *front,
        "",
        f"# {Path(location).name or location}",
        "",
        "A likelihood-trained diffusion model of mulan (variational diffusion with a learned noise process): "
        f"`{model.get('_class_path', 'a DiffusionTask')}` on images of shape "
        f"{tuple(shape)} (C, H, W)" + (f", {values:,} tensor values" if values is not None else "") + ", "
        f"{weights.get(str(config.get('weights')), 'weights of unknown kind')}, stored in {config.get('dtype')}.",
        "",
        "| component | configuration |",
        "|---|---|",
        *[f"| {key} | {_component(model[key])} |" for key in FACTORIES if key in model],
        f"| timesteps | {model.get('timesteps')} ({'continuous time' if not model.get('timesteps') else 'steps'}) |",
        "",
        "## Training data",
        "",
        f"`{data_class}` ({_options(data)})" if data_class else "No data configuration was saved.",
        "",
        "## Training",
        "",
        f"- steps: {config.get('global_step') if config.get('global_step') is not None else 'unknown'}"
        + (f" (checkpoint `{config['source']}`)" if config.get("source") else ""),
        f"- seed: {config.get('seed') if config.get('seed') is not None else 'not recorded'} (evaluation draws are "
        "seeded from it, so `mulan-cli test` on this directory prints the figures it prints on the checkpoint)",
        f"- optimiser: {_component(model['optimizer'])}" if "optimizer" in model else "- optimiser: not recorded",
        "",
        "## Bound",
        "",
    ]
    metrics = dict(config.get("metrics") or {})
    rows = {
        name: f"| `{name}` | {value:.4f} | "
        + (f"± {metrics[name + '_stderr']:.4f} |" if name + "_stderr" in metrics else "– |")
        for name, value in sorted(metrics.items())
        if not name.endswith("_stderr")
    }
    bpd = [row for name, row in rows.items() if name.endswith("bpd")]
    other = [row for name, row in rows.items() if not name.endswith("bpd")]
    if bpd:
        lines += ["| metric | bits/dim | std. err. |", "|---|---|---|", *bpd]
    if other:  # figures in other units (FID, KID, NFE, ...)
        lines += ["", "| other metric | value | std. err. |", "|---|---|---|", *other]
    if not rows:
        lines += [
            "Not evaluated. Evaluate it with the command below, then record the figures with "
            f"`python -m mulan.export CHECKPOINT {location} --metrics metrics.csv`.",
        ]
    lines += [
        "",
        "## Evaluate and load",
        "",
        "```bash",
        f"mulan-cli test --ckpt_path {location}",
        "```",
        "",
        "```python",
        "import mulan.export",
        f"model = mulan.export.from_pretrained({location!r})   # a DiffusionModel; model.config is config.json",
        "```",
        "",
        "`config.json` holds the model and data configuration (class paths and options), the SHA-256 of the "
        "tensors and the configuration (a directory changed after saving is refused; it is not a signature), and "
        "`model.safetensors` the tensors.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ script
def main(argv: list[str] | None = None) -> Path:
    """``python -m mulan.export CHECKPOINT OUT``: export (OUT ending in ``.safetensors``) or save a pretrained
    directory (any other OUT), and print what was written."""
    parser = argparse.ArgumentParser(
        prog="python -m mulan.export",
        description="Export the (EMA) weights and the configuration of a mulan-cli checkpoint: to one safetensors "
        "file (OUT ending in .safetensors), or to a directory with config.json, model.safetensors and a model card "
        "README.md (any other OUT).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by mulan-cli fit (or an export to re-save as a directory)")
    parser.add_argument("out", help="the .safetensors file, or the directory, to write")
    parser.add_argument(
        "--metrics",
        help="directory only: a JSON object {name: number} or a Lightning metrics.csv of mulan-cli test, recorded "
        "in config.json and shown in the card (test/bpd with test/bpd_stderr as its ±)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(STORAGE_DTYPES),
        help="directory only: the dtype the denoiser's weights are stored in (the rest stays float32)",
    )
    args = parser.parse_args(argv)
    if Path(args.out).suffix.lower() != ".safetensors":
        metrics = read_metrics(args.metrics) if args.metrics else None
        folder = save_pretrained(args.checkpoint, args.out, metrics=metrics, dtype=args.dtype)
        content = read_pretrained(folder)
        metrics = content.config["metrics"]
        bound = [f"{k} {v:.4f} ± {metrics[k + '_stderr']:.4f}" for k, v in metrics.items() if k + "_stderr" in metrics]
        recorded = ", ".join(bound) or ("recorded without a standard error" if metrics else "not evaluated")
        print(
            f"wrote {folder}/: config.json, model.safetensors ({len(content.tensors)} tensors, denoiser in "
            f"{content.config['dtype']}), README.md; {content.config['weights']} weights at step "
            f"{content.config['global_step']}; bound: {recorded}.\n"
            f"Load it with mulan.export.from_pretrained({str(folder)!r}), or evaluate it with "
            f"mulan-cli test --ckpt_path {folder}"
        )
        return folder
    if args.metrics or args.dtype != "float32":
        parser.error("--metrics and --dtype apply to a directory; give an OUT without the .safetensors suffix.")
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
