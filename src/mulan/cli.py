"""``mulan-cli``: the LightningCLI behind ``fit``, ``validate`` and ``test`` (also ``python -m mulan``)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mulan.lightning.callbacks import SampleWriter
from mulan.lightning.module import DiffusionModule

EVAL_SUBCOMMANDS = ("test", "validate", "predict")


def load_checkpoint(path: str, error: Any = None) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors for missing, corrupted or unsafe files."""

    def fail(message: str) -> NoReturn:
        if error is not None:
            error(message)
        raise ValueError(message)

    if not Path(path).is_file():
        fail(f"checkpoint {path!r} does not exist (give the path of a .ckpt file written by `mulan-cli fit`).")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln), str(exc)[:200])
        if "global" in detail.lower():
            fail(
                f"checkpoint {path!r} was refused: it holds pickled Python objects beyond tensors and plain "
                "containers, and mulan loads checkpoints with weights_only=True so that no code inside runs. "
                f"Only load checkpoints you trust ({detail})."
            )
        fail(f"checkpoint {path!r} cannot be read: it is truncated or corrupted, or not a checkpoint ({detail}).")
    except (RuntimeError, EOFError, OSError) as exc:
        fail(f"checkpoint {path!r} cannot be read: it is truncated or corrupted ({type(exc).__name__}: {exc}).")


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


class MulanCLI(LightningCLI):
    """LightningCLI with the data's image shape linked into the model, checkpoint-only evaluation, and an
    optional test right after ``fit`` (``--test_after_fit true``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.image_shape", "model.init_args.image_shape", apply_on="instantiate")
        parser.add_argument(
            "--predict_output_dir", type=str, default="samples", help="Where `predict` writes samples and figures."
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the best checkpoint and print where the logs are.",
        )

    def before_instantiate_classes(self) -> None:
        # Checkpoints are loaded with weights_only=True (no pickled code runs) unless a user explicitly says otherwise.
        config = self.config[self.subcommand]
        if "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None or isinstance(args, list):  # command-line style: maybe start from a checkpoint's config
            self.config = parser.parse_args(self._with_checkpoint_config(list(sys.argv[1:] if args is None else args)))
        else:
            super().parse_arguments(parser, args)

    def _with_checkpoint_config(self, argv: list[str]) -> list[str]:
        """For ``test``/``validate``/``predict``: require ``--ckpt_path`` and start from the model and data
        configuration saved in the checkpoint; ``--model.init_args.X`` and ``--data.init_args.X`` override single
        options, ``--model CONFIG`` / ``--data CONFIG`` replace the whole component."""
        subcommand = next((a for a in argv if a in self.subcommands()), None)
        if subcommand not in EVAL_SUBCOMMANDS or {"-h", "--help"} & set(argv):
            return argv
        ckpt_path = _option_value(argv, "--ckpt_path")
        if not ckpt_path:
            self._exit(
                f"`mulan-cli {subcommand}` needs a trained model: pass --ckpt_path PATH/TO/model.ckpt "
                "(without it Lightning would evaluate randomly initialised weights)."
            )
        checkpoint = load_checkpoint(ckpt_path, error=self._exit)
        injected = []
        for key, saved in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
            given = any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv)  # replaced, not overridden
            config = _class_config(checkpoint.get(saved, {}))
            if not given and config is not None:
                injected.append(f"--{key}={json.dumps(config)}")
        where = argv.index(subcommand) + 1
        return argv[:where] + injected + argv[where:]

    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite the model configuration with the checkpoint's after parsing, discarding
        command-line overrides; here the checkpoint's configuration was put first and the command line applies
        on top of it (see :meth:`_with_checkpoint_config`)."""

    @staticmethod
    def _exit(message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # a Trainer property mypy doesn't see
        if self.subcommand == "predict" and not any(isinstance(c, SampleWriter) for c in callbacks):
            callbacks.append(SampleWriter(self.config.predict.predict_output_dir))
        return trainer

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
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        finally:
            self.trainer.callbacks.extend(averaging)  # type: ignore[attr-defined]
        log_dir = self.trainer.log_dir
        print(f"\nTensorBoard logs: {log_dir}  (tensorboard --logdir {Path(log_dir).parent if log_dir else '.'})")
        print(f"Checkpoint: {best or '(none saved)'}")
        if best:
            print(f"Evaluate it again with: mulan-cli test --ckpt_path {best}")


def build_cli(args: list[str] | None = None, run: bool = True) -> MulanCLI:
    """The CLI object (its ``trainer``, ``model``, ``datamodule``); ``args`` as on the command line."""
    return MulanCLI(
        DiffusionModule,
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
