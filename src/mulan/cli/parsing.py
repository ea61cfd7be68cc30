"""The checkpoint-first LightningCLI: parsing, the checkpoint's configuration under the options given, and building.

``test``, ``validate`` and ``predict`` need ``--ckpt_path`` and rebuild the model and the data from the
configuration saved in it; options given on the command line or in ``--config`` apply on top, and one that would
change the model (and so the bound being evaluated) is refused with the difference named, unless
``--override_checkpoint_config true`` (then the differences are printed and applied). ``fit --ckpt_path FILE`` is
checked the same way before Lightning reads the file. :class:`mulan.cli.MulanCLI` adds the ``fit`` hooks.
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mulan.checkpoints import is_safetensors, load_checkpoint
from mulan.cli.checkpoint_config import model_differences, saved_configs
from mulan.cli.errors import MulanParser, config_texts, exit_with_error, library_error, renamed_hint
from mulan.export import load_into_task
from mulan.lightning.checkpoint_io import AtomicCheckpointIO
from mulan.lightning.pictures import SampleWriter
from mulan.lightning.task import DiffusionTask
from mulan.trusted import TRUSTED_ENV

EVAL_SUBCOMMANDS = ("test", "validate", "predict")
LIGHTNING_CKPT_NAMES = ("last", "hpc")
"""``fit --ckpt_path`` values that Lightning resolves to a file itself (mulan resolves them first, the same way, and
checks the file before Lightning reads it)."""

rank_zero_print = rank_zero_only(print)


def _option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def as_dict(value: Any) -> dict[str, Any]:
    """A jsonargparse namespace (or a mapping, or None) as a plain dict."""
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


class CheckpointFirstCLI(LightningCLI):
    """LightningCLI with the data's image shape linked into the model, checkpoint-first evaluation, full option
    names only, one-line errors, the checkpoint's safe loading and atomic checkpoint writes, and a checked
    ``predict`` output folder."""

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
        MulanParser.hint = renamed_hint(" ".join(argv) + "".join(config_texts(argv)))
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
        try:
            return saved_configs(checkpoint, source, _trusted_classes(argv))
        except ValueError as error:
            self._exit(str(error))

    def _refuse_differences(self, subcommand: str, ckpt_path: str, saved_model: Any, config: Any) -> None:
        differences = model_differences(as_dict(saved_model), as_dict(config["model"]))
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
            rank_zero_print(f"override_checkpoint_config: {line}")

    @staticmethod
    def _exit(message: str) -> NoReturn:
        exit_with_error(message)

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
