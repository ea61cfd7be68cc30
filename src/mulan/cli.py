"""``mulan-cli``: the LightningCLI behind ``fit``, ``validate``, ``test`` and ``predict`` (also ``python -m mulan``).

Evaluation starts from the checkpoint: ``test``, ``validate`` and ``predict`` need ``--ckpt_path`` and rebuild the
model and the data from the configuration saved in it. Options given on the command line or in ``--config`` apply
on top; an option that would change the model (and so the bound being evaluated) is refused with the difference
named, unless ``--override_checkpoint_config true`` is given (then the differences are printed and applied).
The CLI uses LightningCLI's public hooks (``init_parser``, ``parse_arguments``, ``before_instantiate_classes``,
``before_fit``, ``after_fit``). Two places lean on Lightning 2.6 internals, each held by a test:
:class:`~mulan.lightning.checkpoint_io.LastCheckpoint` calls ``ModelCheckpoint``'s private save helpers, and
``fit --ckpt_path last|hpc`` is resolved with the trainer's checkpoint connector
(``tests/test_checkpoint_retention.py``, ``tests/test_cli_errors.py``).

Errors end the run with one line, ``error: ...``, exit status 2; ``--debug`` or ``MULAN_DEBUG=1`` raises them with
their traceback instead (:func:`main`).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mulan.export import TRUSTED_ENV, check_class_paths, is_safetensors, load_into_task
from mulan.lightning.callbacks import PICTURES_DIR, SampleWriter
from mulan.lightning.checkpoint_io import AtomicCheckpointIO, load_checkpoint
from mulan.lightning.task import DiffusionTask
from mulan.model import BOUND_TERMS

EVAL_SUBCOMMANDS = ("test", "validate", "predict")
LIGHTNING_CKPT_NAMES = ("last", "hpc")
"""``fit --ckpt_path`` values that Lightning resolves to a file itself (mulan resolves them first, the same way, and
checks the file before Lightning reads it)."""

EVALUATION_OPTIONS = {
    "sample_steps",
    "sampler",
    "optimizer",
    "lr_scheduler",
    "process_lr",
    "process_weight_decay",
    "time_sampler",
}
"""Model options that do not change the model's bound, so evaluation (and a resumed fit) may change them freely.

Everything else defines the bound and is refused when it differs from the checkpoint's: the process (its class and
every option, e.g. ``gamma_min``), the latent (its class, ``m``, ``k``, ...), ``timesteps``, the parameterisation,
the denoiser and its options, ``channels_last`` is harmless but kept strict. The time sampler is here: it draws the
times of the one-sample estimate with importance weights ``1/pi(t)``, so the estimate's expectation, the bound, is
the same whatever the sampler (docs: math, section 6c); only its variance, and so the reported standard error,
changes. The optimiser, its schedule and the process's learning rate and weight decay only act in training, and
the sampler and its step count only in ``predict``."""

DEBUG_ENV = "MULAN_DEBUG"
"""Environment variable: ``MULAN_DEBUG=1`` makes ``mulan-cli`` raise errors with their traceback (as ``--debug``)."""
DEBUG_HINT = f"rerun with {DEBUG_ENV}=1 (or --debug) to see the traceback"
WRAPPERS = ("jsonargparse",)
"""Packages whose exceptions only wrap the library's own (jsonargparse's instantiation errors): skipped to reach the
message that names the problem."""

RENAMED = {
    "mulan.lightning.module.DiffusionModule": "mulan.lightning.DiffusionTask",
    "DiffusionModule": "mulan.lightning.DiffusionTask",
    "init_args.schedule": "init_args.process",
    "schedule_lr": "process_lr",
    "schedule_weight_decay": "process_weight_decay",
}
"""Names of the 0.1 configuration that changed, and what to write instead."""

_rank_zero_print = rank_zero_only(print)


def _raise_site(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return frames[-1].filename if frames else ""


def library_error(error: BaseException) -> BaseException:
    """The exception that names the problem: the outermost of the chain, past jsonargparse's wrappers (a
    constructor's ``ValueError`` arrives wrapped in one). The library's own message is kept even when it was raised
    from a lower-level error (PIL's, zipfile's)."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        wrapped = any(f"{os.sep}{name}{os.sep}" in _raise_site(error) for name in WRAPPERS)
        if inner is None or not wrapped:
            return error
        error = inner
    return error


def _raised_by_mulan(error: BaseException) -> bool:
    return _raise_site(error).startswith(str(Path(__file__).parent) + os.sep)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_line(error: BaseException) -> str:
    """One line for ``error: ...``: the library's own message as it is; any other error (a bug, or a condition the
    library does not check) with its type and how to see the traceback."""
    error = library_error(error)
    text = _one_line(str(error)) or type(error).__name__
    if _raised_by_mulan(error):
        return text
    return f"{type(error).__name__}: {text} (unexpected; {DEBUG_HINT})"


_NOISE = (
    "Does not validate against any of",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
    "Parser key",
    "Problem with given class_path",
    "Problem in default config",
)


def usage_error_line(message: str) -> str:
    """jsonargparse's (multi-line) parse error as one line: the option's full name and the innermost complaint."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_NOISE)]
    detail = useful[-1] if useful else _one_line(message)
    detail = re.sub(r"^Type .*? expects a function or a callable class: ", "", detail)
    detail = re.sub(r"\.? Got value: Namespace\(.*$", "", detail).rstrip(".")
    where = ".init_args.".join(keys)
    return f"{where}: {detail}" if where and not detail.startswith(where) else detail


def _option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _class_config(hparams: dict[str, Any]) -> dict[str, Any] | None:
    """Hyper-parameters saved by LightningCLI (``_class_path`` + init args) as a ``class_path`` config."""
    hparams = dict(hparams)
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    if class_path is None:
        return None
    hparams.pop("image_shape", None)  # a link target: it comes from the data
    return {"class_path": class_path, "init_args": hparams}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (a parsed configuration) as ``{"a.b.c": leaf}``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def model_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``"option: saved -> given"`` for every model option that differs, evaluation-only options excepted."""
    a, b = _flatten(saved), _flatten(given)
    lines = []
    for key in sorted(set(a) | set(b)):
        option = key.removeprefix("init_args.").split(".")[0]
        if option in EVALUATION_OPTIONS or option == "image_shape" or a.get(key) == b.get(key):
            continue
        lines.append(f"model.{key}: {a.get(key)!r} in the checkpoint -> {b.get(key)!r} given")
    return lines


def renamed_hint(text: str) -> str:
    """What to rename, for a configuration written for mulan 0.1 (empty when nothing matches)."""
    hits = [f"{old!r} -> {new!r}" for old, new in RENAMED.items() if old in text]
    return ("; this looks like a mulan 0.1 configuration, rename: " + ", ".join(hits)) if hits else ""


class MulanParser(LightningArgumentParser):
    """LightningCLI's parser with jsonargparse's usage dump reduced to one line: ``error: <option>: <problem>``."""

    hint = ""
    """Appended to the error (a rename hint for an old configuration); set by :meth:`MulanCLI._parse`."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"error: {usage_error_line(message)}{MulanParser.hint}\n")
        raise SystemExit(2)


class MulanCLI(LightningCLI):
    """LightningCLI with the data's image shape linked into the model, checkpoint-first evaluation and resuming, full
    option names only, one-line errors, and an optional test right after ``fit`` (``--test_after_fit true``)."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_step is an error, not max_steps
        self.parser_class = MulanParser
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.image_shape", "model.init_args.image_shape", apply_on="instantiate")
        parser.add_argument(
            "--predict_output_dir", type=str, default="samples", help="Where `predict` writes samples and figures."
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the best checkpoint and say where the logs are.",
        )
        parser.add_argument(
            "--baseline",
            type=str | None,
            default=None,
            help="A figure to compare with, printed after the test of --test_after_fit (for example the test bound of "
            "the VDM baseline with the same denoiser and budget, and where it was measured).",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Let fit write into a directory that already holds a run's config.yaml or checkpoints (a resumed fit "
            "writes its configuration beside the earlier one instead), and predict into one that already holds "
            "samples.",
        )
        parser.add_argument(
            "--override_checkpoint_config",
            type=bool,
            default=False,
            help="Evaluation and resuming: apply model options that differ from the checkpoint's (printed) instead of "
            "refusing.",
        )
        parser.add_argument(
            "--trusted_classes",
            type=str | list[str],
            default="",
            help="Class paths (pkg.mod.Class) or module prefixes ending in '.' (pkg.) that a checkpoint's or export's "
            f"saved configuration may name besides mulan's own classes (also: {TRUSTED_ENV}, comma-separated). "
            "Give it on the command line.",
        )

    # ------------------------------------------------------------------------------------------ parsing
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if not (args is None or isinstance(args, list)):
            super().parse_arguments(parser, args)
            return
        argv = list(sys.argv[1:] if args is None else args)
        subcommand = next((a for a in argv if a in self.subcommands()), None)
        ckpt_path = _option_value(argv, "--ckpt_path") if subcommand else None
        self._ckpt_path = None
        if subcommand is None or {"-h", "--help"} & set(argv):
            self.config = self._parse(parser, argv)
            return
        if subcommand == "fit" and ckpt_path in LIGHTNING_CKPT_NAMES:  # resolved and checked in before_fit
            ckpt_path = None
        checkpoint = load_checkpoint(ckpt_path, error=self._exit) if ckpt_path else None
        if subcommand not in EVAL_SUBCOMMANDS and checkpoint is None:
            self.config = self._parse(parser, argv)
            return
        if checkpoint is None or ckpt_path is None:
            self._exit(
                f"`mulan-cli {subcommand}` needs a trained model: pass --ckpt_path PATH/TO/model.ckpt "
                "(without it Lightning would evaluate randomly initialised weights)."
            )
        self.config = self._checkpoint_first(parser, argv, subcommand, ckpt_path, checkpoint)
        # Lightning would now merge the checkpoint's model hyper-parameters over this configuration again, undoing
        # the options given on top; the checkpoint path is handed back before instantiation.
        self._ckpt_path = self.config[subcommand]["ckpt_path"]
        self.config[subcommand]["ckpt_path"] = None

    def _parse(self, parser: LightningArgumentParser, argv: list[str]) -> Any:
        MulanParser.hint = renamed_hint(" ".join(argv) + "".join(_config_texts(argv)))
        try:
            return parser.parse_args(argv)
        finally:
            MulanParser.hint = ""

    def _checkpoint_first(
        self, parser: LightningArgumentParser, argv: list[str], subcommand: str, ckpt_path: str, checkpoint: dict
    ) -> Any:
        """Parse with the checkpoint's model and data configuration first and ``argv`` on top; refuse model
        options that differ from the checkpoint's unless ``--override_checkpoint_config true``. The class paths
        saved in the file are checked against the allowed classes before any of them is imported."""
        injected = self._saved_configs(argv, ckpt_path, checkpoint)
        if not injected.get("model") and not _gives(argv, "--model"):
            self._exit(
                f"{ckpt_path} holds no model configuration saved by mulan-cli fit (its hyper_parameters have no "
                "'_class_path'), so the model cannot be rebuilt from it: give the configuration it was trained with, "
                "--config C (or --model)."
            )
        if not injected.get("data") and not _gives(argv, "--data"):
            self._exit(
                f"{ckpt_path} holds no data configuration: give the data with --config C (or --data), as in the "
                "run that trained it."
            )
        options = [f"--{key}={json.dumps(value)}" for key, value in injected.items()]
        where = argv.index(subcommand) + 1
        argv = argv[:where] + options + argv[where:]
        config = self._parse(parser, argv)
        if injected.get("model"):
            # the checkpoint's model over everything given: what the checkpoint defines, with the same data
            saved = self._parse(parser, [*argv, f"--model={json.dumps(injected['model'])}"])
            self._refuse_differences(subcommand, ckpt_path, saved[subcommand]["model"], config[subcommand])
        return config

    def _saved_configs(self, argv: list[str], source: str, checkpoint: dict) -> dict[str, dict[str, Any]]:
        """The checkpoint's model and data configuration (``class_path`` form), checked against the allowlist."""
        trusted = _trusted_classes(argv)
        configs = {}
        for key, saved in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
            hparams = checkpoint.get(saved) or {}
            try:
                check_class_paths(hparams, source, trusted)
            except ValueError as error:
                self._exit(str(error))
            config = _class_config(hparams)
            if config is not None:
                configs[key] = config
        return configs

    def _refuse_differences(self, subcommand: str, ckpt_path: str, saved_model: Any, config: Any) -> None:
        differences = model_differences(_as_dict(saved_model), _as_dict(config["model"]))
        if differences and not config["override_checkpoint_config"]:
            consequence = (
                "fit would train another model than the one whose weights and optimiser state it resumes"
                if subcommand == "fit"
                else "the bound would not be the trained model's"
            )
            self._exit(
                f"the model options given differ from those saved in {ckpt_path}, so {consequence}: "
                + "; ".join(differences)
                + ". Leave them out (the checkpoint's are used), or pass --override_checkpoint_config true to "
                "use them anyway."
            )
        for line in differences:
            _rank_zero_print(f"override_checkpoint_config: {line}")

    @staticmethod
    def _exit(message: str) -> NoReturn:
        sys.stderr.write(f"error: {_one_line(message)}\n")
        raise SystemExit(2)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand and getattr(self, "_ckpt_path", None):
            config["ckpt_path"] = self._ckpt_path
        # Checkpoints are loaded with weights_only=True (no pickled code runs), whatever the command line says.
        if "weights_only" in config:
            config["weights_only"] = True

    def after_instantiate_classes(self) -> None:
        """A model ``image_shape`` given by hand must be the data's (it is linked from the data); and for
        ``--ckpt_path model.safetensors`` (written by ``python -m mulan.export``) the weights are loaded here, after
        the model and data were built from the file's configuration, and the Trainer gets no checkpoint path (it
        reads only Lightning checkpoints)."""
        super().after_instantiate_classes()
        self._check_image_shape()
        config = self.config_init.get(self.subcommand) if self.subcommand else None
        path = config.get("ckpt_path") if config else None
        if config and path and is_safetensors(path):
            load_into_task(self.model, path)
            config["ckpt_path"] = None

    def _check_image_shape(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        given = config["model"]["init_args"].get("image_shape")
        data_shape = getattr(self.datamodule, "image_shape", None)
        default = inspect.signature(DiffusionTask).parameters["image_shape"].default
        if given is None or data_shape is None or tuple(given) in (tuple(default), tuple(data_shape)):
            return
        self._exit(
            f"model.init_args.image_shape is {tuple(given)}, but the data's images have shape {tuple(data_shape)}: the "
            "model's image shape comes from the data. Leave model.init_args.image_shape out."
        )

    def instantiate_classes(self) -> None:
        """Build the model, data and trainer; a constructor's error (``k >= m``, ``gamma_min >= gamma_max``, a batch
        size of 0, ...) is raised as the constructor raised it, not wrapped in jsonargparse's error
        (``mulan-cli`` prints it as one line)."""
        try:
            super().instantiate_classes()
        except Exception as error:
            inner = library_error(error)
            if inner is error:
                raise
            raise inner from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand and not config.get("trainer", {}).get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])  # complete checkpoint files or none
        trainer = super().instantiate_trainer(**kwargs)
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # a Trainer property mypy doesn't see
        if self.subcommand == "predict" and not any(isinstance(c, SampleWriter) for c in callbacks):
            callbacks.append(SampleWriter(self._writable_output_dir(config)))
        return trainer

    def _writable_output_dir(self, config: Any) -> str:
        """``predict_output_dir``, checked writable and free of earlier samples before any sampling starts."""
        folder = Path(config["predict_output_dir"])
        if (folder / "samples.npz").exists() and not config["overwrite"]:
            self._exit(f"{folder}/ already holds samples.npz; give another --predict_output_dir, or --overwrite true.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            self._exit(
                f"cannot write predictions to {folder}/ ({error.strerror}); give a writable --predict_output_dir."
            )
        return str(folder)

    # ------------------------------------------------------------------------------------------ fit
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
            argv = ["fit", f"--data={json.dumps(_as_dict(self.config.fit.data))}"]
            saved = self._saved_configs(argv, resolved, checkpoint).get("model")
            if saved is not None:
                baseline = self._parse(self.parser, [*argv, f"--model={json.dumps(saved)}"])
                self._refuse_differences("fit", resolved, baseline.fit.model, self.config.fit)
        self.config_init.fit.ckpt_path = resolved
        self.config.fit.ckpt_path = resolved
        if resolved is None:
            _rank_zero_print(f"--ckpt_path {ckpt_path}: no checkpoint found, so fit starts from the beginning.")
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
                _rank_zero_print(
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
            _rank_zero_print(line)


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


def _as_dict(value: Any) -> dict[str, Any]:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value or {})


def _gives(argv: list[str], option: str) -> bool:
    """Whether ``argv`` gives ``option`` (or one of its sub-options) or a ``--config``."""
    return any(a in ("-c", "--config") or a.startswith(("--config=", option)) for a in argv)


def _trusted_classes(argv: list[str]) -> list[str]:
    """``--trusted_classes`` from the command line: ``A``, ``A,B``, ``[A, B]``, repeated or ``+=``."""
    found: list[str] = []
    for i, arg in enumerate(argv):
        value = None
        if arg in ("--trusted_classes", "--trusted_classes+") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--trusted_classes=", "--trusted_classes+=")):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        found += [v.strip(" '\"") for v in value.strip().removeprefix("[").removesuffix("]").split(",")]
    return [v for v in found if v]


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


def _config_texts(argv: list[str]) -> list[str]:
    """The text of every ``--config`` file named in ``argv`` (for rename hints)."""
    texts = []
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path and Path(path).is_file():
            texts.append(Path(path).read_text())
    return texts


def build_cli(args: list[str] | None = None, run: bool = True) -> MulanCLI:
    """The CLI object (its ``trainer``, ``model``, ``datamodule``); ``args`` as on the command line (without a
    subcommand when ``run=False``). Errors are raised (``mulan-cli`` prints them as one line)."""
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


def main(args: list[str] | None = None) -> None:
    """Entry point of ``mulan-cli`` and ``python -m mulan``; ``args`` as on the command line.

    An error ends the run with one line on stderr, ``error: ...`` (the library's own message: what is wrong, where,
    and how to fix it), and exit status 2. ``--debug`` (anywhere on the line) or the environment variable
    ``MULAN_DEBUG=1`` raises it with its traceback instead."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        build_cli(argv)
    except Exception as error:
        if debug:
            raise
        sys.stderr.write(f"error: {error_line(error)}\n")
        raise SystemExit(2) from None
