"""``mulan-cli``: the LightningCLI behind ``fit``, ``validate``, ``test`` and ``predict`` (also ``python -m mulan``).

Evaluation starts from the checkpoint: ``test``, ``validate`` and ``predict`` need ``--ckpt_path`` and rebuild the
model and the data from the configuration saved in it. Options given on the command line or in ``--config`` apply
on top; an option that would change the model (and so the bound being evaluated) is refused with the difference
named, unless ``--override_checkpoint_config true`` is given (then the differences are printed and applied).
Everything here uses LightningCLI's public hooks (``init_parser``, ``parse_arguments``,
``before_instantiate_classes``, ``after_fit``).
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mulan.export import is_safetensors, load_into_task
from mulan.lightning.callbacks import PICTURES_DIR, SampleWriter
from mulan.lightning.checkpoint_io import AtomicCheckpointIO, load_checkpoint
from mulan.lightning.task import DiffusionTask
from mulan.model import BOUND_TERMS

EVAL_SUBCOMMANDS = ("test", "validate", "predict")
LIGHTNING_CKPT_NAMES = ("last", "hpc")
"""``fit --ckpt_path`` values that Lightning resolves to a file itself."""

EVALUATION_OPTIONS = {"sample_steps", "sampler", "optimizer", "lr_scheduler", "process_lr", "process_weight_decay"}
"""Model options that do not change the model's bound, so evaluation may change them freely."""

RENAMED = {
    "mulan.lightning.module.DiffusionModule": "mulan.lightning.DiffusionTask",
    "DiffusionModule": "mulan.lightning.DiffusionTask",
    "init_args.schedule": "init_args.process",
    "schedule_lr": "process_lr",
    "schedule_weight_decay": "process_weight_decay",
}
"""Names of the 0.1 configuration that changed, and what to write instead."""


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


class MulanCLI(LightningCLI):
    """LightningCLI with the data's image shape linked into the model, checkpoint-first evaluation, full option
    names only, and an optional test right after ``fit`` (``--test_after_fit true``)."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_step is an error, not max_steps
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
            help="Let fit write into a directory that already holds a run's config.yaml or checkpoints, and predict "
            "into one that already holds samples.",
        )
        parser.add_argument(
            "--override_checkpoint_config",
            type=bool,
            default=False,
            help="Evaluation: apply model options that differ from the checkpoint's (printed) instead of refusing.",
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
        if subcommand == "fit" and ckpt_path in LIGHTNING_CKPT_NAMES:  # resolved (and loaded safely) by Lightning
            ckpt_path = None
        checkpoint = load_checkpoint(ckpt_path, error=self._exit) if ckpt_path else None
        if subcommand not in EVAL_SUBCOMMANDS:
            self.config = self._parse(parser, argv)
            return
        if checkpoint is None or ckpt_path is None:
            self._exit(
                f"`mulan-cli {subcommand}` needs a trained model: pass --ckpt_path PATH/TO/model.ckpt "
                "(without it Lightning would evaluate randomly initialised weights)."
            )
        self.config = self._checkpoint_first(parser, argv, subcommand, ckpt_path, checkpoint)
        # Lightning would now merge the checkpoint's model hyper-parameters over this configuration again, undoing
        # the evaluation-only options given on top; the checkpoint path is handed back before instantiation.
        self._ckpt_path = self.config[subcommand]["ckpt_path"]
        self.config[subcommand]["ckpt_path"] = None

    def _parse(self, parser: LightningArgumentParser, argv: list[str]) -> Any:
        try:
            return parser.parse_args(argv)
        except SystemExit:
            hint = renamed_hint(" ".join(argv) + "".join(_config_texts(argv)))
            if hint:
                sys.stderr.write(f"error: {hint.removeprefix('; ')}\n")
            raise

    def _checkpoint_first(
        self, parser: LightningArgumentParser, argv: list[str], subcommand: str, ckpt_path: str, checkpoint: dict
    ) -> Any:
        """Parse with the checkpoint's model and data configuration first and ``argv`` on top; refuse model
        options that differ from the checkpoint's unless ``--override_checkpoint_config true``."""
        injected = []
        for key, saved in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
            config = _class_config(checkpoint.get(saved, {}))
            if config is not None:
                injected.append(f"--{key}={json.dumps(config)}")
        where = argv.index(subcommand) + 1
        baseline = self._parse(parser, [subcommand, *injected, f"--ckpt_path={ckpt_path}"])
        config = self._parse(parser, argv[:where] + injected + argv[where:])
        differences = model_differences(baseline[subcommand]["model"].as_dict(), config[subcommand]["model"].as_dict())
        if differences and not config[subcommand]["override_checkpoint_config"]:
            self._exit(
                f"the model options given differ from those saved in {ckpt_path}, so the bound would not be the "
                "trained model's: " + "; ".join(differences) + ". Leave them out (the checkpoint's are used), or "
                "pass --override_checkpoint_config true to evaluate with them anyway."
            )
        for line in differences:
            print(f"override_checkpoint_config: {line}")
        return config

    @staticmethod
    def _exit(message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}\n")
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
        size of 0, ...) is printed as its own one-line message instead of a chain of tracebacks."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            root: BaseException = error
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__  # type: ignore[assignment]
            self._exit(str(root) if isinstance(root, ValueError) else f"{type(root).__name__}: {root}")

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

    def before_fit(self) -> None:
        """Refuse to write over an earlier run's config.yaml or checkpoints unless ``--overwrite true``."""
        if self.config.fit.get("overwrite") or self.config.fit.get("ckpt_path"):  # resuming continues a run
            return
        trainer = self.trainer
        taken = [Path(trainer.log_dir or trainer.default_root_dir) / "config.yaml"]
        for callback in trainer.checkpoint_callbacks:
            folder = Path(getattr(callback, "dirpath", None) or Path(trainer.log_dir or ".") / "checkpoints")
            taken += sorted(folder.glob("*.ckpt"))[:1]
        taken = [path for path in taken if path.exists()]
        if taken:
            self._exit(
                f"{taken[0]} exists: a previous run wrote into this directory, and fit would overwrite it. Give a new "
                "--trainer.default_root_dir (or a logger that versions its runs), or --overwrite true."
            )

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or None
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
        print("\n" + summary_line(results[0] if results else {}))
        if self.config.fit.get("baseline"):
            print(f"Compare with: {self.config.fit.baseline}")
        log_dir = self.trainer.log_dir
        print(f"\nTensorBoard logs: {log_dir}  (tensorboard --logdir {Path(log_dir).parent if log_dir else '.'})")
        print(f"Checkpoint: {best or '(none saved)'}")
        pictures = Path(log_dir or ".") / PICTURES_DIR
        if pictures.is_dir():
            print(f"Pictures: {pictures}/ ({', '.join(sorted(p.name for p in pictures.iterdir()))})")
        if best:
            print(f"Evaluate it again with: mulan-cli test --ckpt_path {best}")


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
    subcommand when ``run=False``)."""
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
    """Entry point of ``mulan-cli`` and ``python -m mulan``; ``args`` as on the command line."""
    build_cli(args)
