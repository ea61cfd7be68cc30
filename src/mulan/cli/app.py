"""``mulan-cli``: the LightningCLI behind ``fit``, ``validate``, ``test`` and ``predict`` (also ``python -m mulan``).

:class:`MulanCLI` is the checkpoint-first CLI (:mod:`mulan.cli.parsing`) with the ``fit`` hooks: before anything
is trained, the optimiser's options, the output folders and a resumed checkpoint are checked; after it, an optional
test of the best checkpoint (``--test_after_fit true``) and a summary. ``fit --ckpt_path last|hpc`` is resolved
with the trainer's checkpoint connector, one of the two places that lean on Lightning 2.6 internals (held by
``tests/test_cli_errors.py``). :func:`main` prints any error as one line (:mod:`mulan.cli.errors`).

What a run shows: the training bar counts steps out of ``max_steps``
(:class:`~mulan.lightning.progress.StepProgressBar`, unless the configuration names a bar), Lightning's tip banners
are filtered out while the CLI runs, and ``predict --num_samples N`` draws exactly ``N`` samples.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn

from mulan.checkpoints import load_checkpoint
from mulan.cli.errors import debug_requested, error_line
from mulan.cli.parsing import LIGHTNING_CKPT_NAMES, CheckpointFirstCLI, as_dict, rank_zero_print
from mulan.lightning.pictures import PICTURES_DIR, fixed_count_loader
from mulan.lightning.progress import StepProgressBar
from mulan.lightning.task import DiffusionTask
from mulan.model import BOUND_TERMS


class MulanCLI(CheckpointFirstCLI):
    """LightningCLI with the data's image shape linked into the model, checkpoint-first evaluation and resuming, full
    option names only, one-line errors, and an optional test right after ``fit`` (``--test_after_fit true``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--num_samples",
            type=int | None,
            default=None,
            help="predict: draw exactly this many samples, in batches of the data's evaluation batch size (for "
            "conditional data, sample i is given test input i mod the test split's size). Default: one sample per "
            "test image.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer, with :class:`~mulan.lightning.progress.StepProgressBar` (``step N/max_steps``)
        unless the configuration names a progress bar or sets ``enable_progress_bar: false``."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}
        if "callbacks" not in kwargs and trainer.get("enable_progress_bar") is not False:
            given = trainer.get("callbacks") or []
            given = given if isinstance(given, list) else [given]
            if not any(isinstance(callback, ProgressBar) for callback in given):
                kwargs["callbacks"] = [*given, StepProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def before_predict(self) -> None:
        """``--num_samples N``: the data module's predict loader is replaced, for this run, by one of ``N`` items of
        its data set taken cyclically (:func:`~mulan.lightning.pictures.fixed_count_loader`), so predict draws
        exactly ``N`` samples."""
        num_samples = self.config.predict.get("num_samples")
        if num_samples is None:
            return
        if num_samples < 1:
            self._exit(f"--num_samples must be at least 1, got {num_samples}: give how many samples predict draws.")
        datamodule = self.datamodule
        original = datamodule.predict_dataloader
        datamodule.predict_dataloader = lambda: fixed_count_loader(original(), num_samples)

    def after_predict(self) -> None:
        vars(self.datamodule).pop("predict_dataloader", None)  # the data module's own loader again

    def before_fit(self) -> None:
        """Before anything is trained or written: the optimiser's options are checked (built once on the model),
        the output folders must be writable, ``--ckpt_path last|hpc`` is resolved as Lightning would resolve it and
        the file checked (safe to load, the same model), and an earlier run's ``config.yaml`` or checkpoints are
        not overwritten: a fresh fit into such a directory is refused unless ``--overwrite true``; a resumed fit
        writes its configuration beside the earlier one, as ``config-resume-N.yaml``."""
        config = self.config.fit
        self._check_optimiser()
        trainer = self.trainer
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        folders = [log_dir] + [Path(d) for c in trainer.checkpoint_callbacks if (d := getattr(c, "dirpath", None))]
        for folder in folders:
            _check_writable(folder, self._exit)
        ckpt_path = self._resolve_resume(config.get("ckpt_path"))
        if config.get("overwrite"):
            return
        if ckpt_path:
            self._config_beside_earlier(log_dir)
            return
        taken = [log_dir / "config.yaml"]
        for callback in trainer.checkpoint_callbacks:
            folder = Path(getattr(callback, "dirpath", None) or log_dir / "checkpoints")
            taken += sorted(folder.glob("*.ckpt"))[:1]
        taken = [path for path in taken if path.exists()]
        if taken:
            self._exit(
                f"{taken[0]} exists: a previous run wrote into this directory, and fit would overwrite it. Give a new "
                "--trainer.default_root_dir (or a logger that versions its runs), or --overwrite true; to continue "
                "that run, give --ckpt_path (last, or a checkpoint file)."
            )

    def _check_optimiser(self) -> None:
        """Build the optimiser and its schedule once (then discard them), so that an invalid learning rate, weight
        decay, beta or epsilon stops fit before anything is written."""
        try:
            self.model.configure_optimizers()
        except (ValueError, TypeError) as error:
            self._exit(
                f"invalid optimiser option: {error}. Fix model.init_args.optimizer (or lr_scheduler, process_lr, "
                "process_weight_decay) in the configuration or on the command line."
            )

    def _resolve_resume(self, ckpt_path: str | None) -> str | None:
        """``last`` or ``hpc``: the file Lightning would pick (the newest ``last*.ckpt`` of the checkpoint folders,
        the highest ``hpc_ckpt_N.ckpt``), loaded safely and compared with the configured model before Lightning
        reads it; Lightning is then given that file. A path was checked when parsing."""
        if ckpt_path not in LIGHTNING_CKPT_NAMES:
            return ckpt_path
        connector = self.trainer._checkpoint_connector
        try:
            resolved = connector._parse_ckpt_path(
                TrainerFn.FITTING, ckpt_path, model_provided=True, model_connected=False
            )
        except ValueError as error:
            self._exit(str(error))
        if resolved is not None:
            resolved = str(resolved)
            checkpoint = load_checkpoint(resolved, error=self._exit)
            argv = ["fit", f"--data={json.dumps(as_dict(self.config.fit.data))}"]
            saved = self._saved_configs(argv, resolved, checkpoint).get("model")
            if saved is not None:
                baseline = self._parse(self.parser, [*argv, f"--model={json.dumps(saved)}"])
                self._refuse_differences("fit", resolved, baseline.fit.model, self.config.fit)
        self.config_init.fit.ckpt_path = resolved
        self.config.fit.ckpt_path = resolved
        if resolved is None:
            rank_zero_print(f"--ckpt_path {ckpt_path}: no checkpoint found, so fit starts from the beginning.")
        return resolved

    def _config_beside_earlier(self, log_dir: Path) -> None:
        """A resumed fit keeps the earlier run's ``config.yaml`` and saves its own as ``config-resume-N.yaml``."""
        if not (log_dir / "config.yaml").exists():
            return
        n = 1
        while (log_dir / f"config-resume-{n}.yaml").exists():
            n += 1
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, SaveConfigCallback):
                callback.config_filename = f"config-resume-{n}.yaml"
                rank_zero_print(
                    f"Resuming: {log_dir / 'config.yaml'} is kept; this run's configuration is saved as "
                    f"{log_dir / callback.config_filename}"
                )

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit"):
            return
        best = _checkpoint_to_test(self.trainer)
        # The checkpoint's state_dict holds the EMA weights. Lightning's weight-averaging callbacks would, after fit,
        # load the raw weights kept beside them instead (and only swap the average in for validation), so the test
        # runs without them: it evaluates the averaged model, as `mulan-cli test --ckpt_path` does.
        averaging = [c for c in self.trainer.callbacks if isinstance(c, WeightAveraging)]  # type: ignore[attr-defined]
        for callback in averaging:
            self.trainer.callbacks.remove(callback)  # type: ignore[attr-defined]
        try:
            results = self.trainer.test(
                self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True
            )
        finally:
            self.trainer.callbacks.extend(averaging)  # type: ignore[attr-defined]
        lines = ["\n" + summary_line(results[0] if results else {})]
        if self.config.fit.get("baseline"):
            lines.append(f"Compare with: {self.config.fit.baseline}")
        log_dir = self.trainer.log_dir
        lines.append(
            f"\nTensorBoard logs: {log_dir}  (tensorboard --logdir {Path(log_dir).parent if log_dir else '.'})"
        )
        lines.append(f"Checkpoint: {best or '(none saved)'}")
        pictures = Path(log_dir or ".") / PICTURES_DIR
        if pictures.is_dir():
            lines.append(f"Pictures: {pictures}/ ({', '.join(sorted(p.name for p in pictures.iterdir()))})")
        if best:
            lines.append(f"Evaluate it again with: mulan-cli test --ckpt_path {best}")
        for line in lines:  # once, from rank 0, however many processes trained
            rank_zero_print(line)


def _checkpoint_to_test(trainer: Trainer) -> str | None:
    """The best checkpoint by the monitored value (``val/bpd``) when a callback keeps one, else the newest."""
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    for pick in (
        lambda c: c.best_model_path if c.monitor else "",
        lambda c: c.last_model_path,
        lambda c: c.best_model_path,
    ):
        found = next((pick(c) for c in callbacks if pick(c) and Path(pick(c)).is_file()), None)
        if found:
            return found
    return None


def _check_writable(folder: Path, exit_with: Any) -> None:
    """The nearest existing folder at or above ``folder`` accepts a file (nothing is created)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        exit_with(
            f"cannot write the run's output to {folder}/ ({existing}: {error.strerror or error}); give a writable "
            "--trainer.default_root_dir (or the logger's save_dir, or the checkpoint callback's dirpath)."
        )


def summary_line(metrics: Mapping[str, Any], term_names: Sequence[str] = BOUND_TERMS) -> str:
    """One line from a test's logged metrics: the bound in bits/dim as the sum of its named terms, and the dense ELBO
    with its standard error when the evaluation callback logged it."""
    value = {key: float(v) for key, v in metrics.items()}
    if "test/bpd" not in value:
        return "Test bound: not logged"
    terms = " + ".join(f"{n} {value[f'test/{n}_bpd']:.4f}" for n in term_names if f"test/{n}_bpd" in value)
    line = f"Test bound: {value['test/bpd']:.4f} bits/dim" + (f" = {terms}" if terms else "")
    if "test/dense_bpd" in value:
        dense = f"{value['test/dense_bpd']:.4f} ± {value.get('test/dense_bpd_stderr', float('nan')):.4f}"
        line += f"; dense ELBO {dense} bits/dim over {int(value.get('test/dense_images', 0))} images"
    return line


def build_cli(args: list[str] | None = None, run: bool = True) -> MulanCLI:
    """The CLI object (its ``trainer``, ``model``, ``datamodule``); ``args`` as on the command line (without a
    subcommand when ``run=False``). Errors are raised (``mulan-cli`` prints them as one line)."""
    with _without_lightning_tips():
        return MulanCLI(
            DiffusionTask,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )


LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
"""The loggers of Lightning's ``rank_zero_info`` messages, which carry its advertising tips."""


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips (``💡 Tip: For seamless cloud ... try installing litlogger``); keeps every
    other message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("💡 Tip")


@contextlib.contextmanager
def _without_lightning_tips() -> Iterator[None]:
    """While the CLI runs, Lightning's tip banners are filtered out of its info loggers; the filter is removed after,
    so a program that imports mulan keeps its logging as it was."""
    tips = _NoTips()
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addFilter(tips)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(tips)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``mulan-cli`` and ``python -m mulan``; ``args`` as on the command line.

    An error ends the run with one line on stderr, ``error: ...`` (the library's own message: what is wrong, where,
    and how to fix it), and exit status 2. ``--debug`` (anywhere on the line) or the environment variable
    ``MULAN_DEBUG=1`` raises it with its traceback instead."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        build_cli(argv)
    except Exception as error:
        if debug:
            raise
        sys.stderr.write(f"error: {error_line(error)}\n")
        raise SystemExit(2) from None
