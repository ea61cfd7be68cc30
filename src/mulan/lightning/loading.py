"""From a trained model on disk to ``(task, datamodule)``: the one way in for the CLI, the benchmarks and scripts.

    task, data = load_task("runs/demo_mulan/version_0/checkpoints/last.ckpt")   # or "demo.safetensors"
    trainer = lightning.Trainer(logger=False)
    trainer.test(task, datamodule=data)     # the same test bound as mulan-cli test --ckpt_path (bitwise on the CPU)

Both files hold the weights (the EMA average when the run used ``EMAWeightAveraging``) and the hyper-parameters
``mulan-cli fit`` saved: the task's class path and init arguments, and the data module's. The files are read
without unpickling (:func:`~mulan.checkpoints.load_checkpoint`); the class paths they name are checked
(:func:`mulan.export.check_class_paths`) before anything is imported; the task and data module are then built by
jsonargparse's public API (``add_subclass_arguments``, ``instantiate_classes``), as LightningCLI built them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule

from mulan.checkpoints import load_checkpoint
from mulan.export import check_class_paths
from mulan.lightning.task import DiffusionTask

__all__ = ["load_task", "build_from_hparams", "saved_config"]


def saved_config(
    hparams: dict[str, Any], source: str, trusted: Iterable[str] = (), leave_out: Iterable[str] = ()
) -> dict[str, Any] | None:
    """LightningCLI's saved hyper-parameters (``_class_path`` and init arguments, as in a checkpoint's
    ``hyper_parameters`` or ``datamodule_hyper_parameters``) as jsonargparse's ``{"class_path", "init_args"}``
    configuration, without the init arguments named in ``leave_out``; None when nothing was saved (no
    ``_class_path``). Every class path is checked first (:func:`~mulan.export.check_class_paths`, with ``trusted``):
    a refused one raises ValueError in one line and nothing is imported."""
    check_class_paths(hparams, source, trusted)
    # The one place that reads Lightning's saved keys: `_class_path` is the class LightningCLI built and
    # `_instantiator` the function Lightning would call to rebuild it (jsonargparse's parser, as below).
    skip = {"_class_path", "_instantiator", *leave_out}
    if "_class_path" not in hparams:
        return None
    return {"class_path": hparams["_class_path"], "init_args": {k: v for k, v in hparams.items() if k not in skip}}


def build_from_hparams(hparams: dict[str, Any], base: type, source: str, trusted: Iterable[str] = ()) -> Any:
    """The object that LightningCLI's saved hyper-parameters describe (see :func:`saved_config`): a subclass of
    ``base``, freshly initialised, built by jsonargparse (``add_subclass_arguments``, ``instantiate_classes``).
    The caller's random stream is left as it was.

    Raises:
        ValueError: a class path that is not allowed (before anything is imported), hyper-parameters without
            ``_class_path`` (not saved by ``mulan-cli fit``), or options the class does not accept.
    """
    config = saved_config(hparams, source, trusted)
    if config is None:
        raise ValueError(
            f"{source} holds no configuration saved by mulan-cli fit (no '_class_path' in its hyper-parameters), so "
            f"the {base.__name__} cannot be rebuilt from it: load a checkpoint written by mulan-cli fit or its export."
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "built", fail_untyped=False)
    try:
        with torch.random.fork_rng(devices=[]):  # building initialises weights randomly; the caller's stream stays
            return parser.instantiate_classes(parser.parse_object({"built": config})).built
    except Exception as error:  # jsonargparse: an unknown option or a class that is not a subclass of `base`
        raise ValueError(f"{source}: the saved {base.__name__} configuration cannot be built ({error}).") from error


def load_task(
    path: str | Path, trusted: Iterable[str] = (), map_location: str | torch.device = "cpu"
) -> tuple[DiffusionTask, LightningDataModule | None]:
    """The task and data module of a ``.ckpt`` written by ``mulan-cli fit`` or a ``.safetensors`` export
    (``python -m mulan.export``), with the saved weights loaded (the EMA average when the run averaged them).

    Args:
        path: the file.
        trusted: class paths (``pkg.mod.Class``) or module prefixes (``pkg.``) the file may name besides mulan's
            own classes (also the environment variable ``MULAN_TRUSTED_CLASSES``): see
            :func:`~mulan.export.check_class_paths`.
        map_location: the device the task is moved to.

    Returns:
        ``(task, datamodule)``: the task in eval mode on ``map_location``, with the run's seed (from which its
        validation and test draws are seeded) when the file records it (a checkpoint of ``mulan-cli fit``, and its
        export); the data module, not set up, or None when the file saved none.

    Raises:
        ValueError: a missing, unsafe or corrupted file, a class path that is not allowed (before anything is
            imported), or weights that do not fit the saved configuration; each in one line.
    """
    source = str(path)
    checkpoint = load_checkpoint(source)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    data_hparams = checkpoint.get("datamodule_hyper_parameters")
    check_class_paths(data_hparams or {}, source, trusted)  # both checked before either is built
    task = build_from_hparams(hparams, DiffusionTask, source, trusted)
    data = build_from_hparams(dict(data_hparams), LightningDataModule, source, trusted) if data_hparams else None
    task.on_load_checkpoint(checkpoint)  # Lightning's hook: the run's evaluation seed, the image shape checked
    task.load_state_dict(checkpoint["state_dict"])
    return task.to(map_location).eval(), data
