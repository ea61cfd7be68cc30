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

``mulan-cli``, ``mulan-cli --help`` and ``mulan-cli --version`` answer from static text without importing torch
or Lightning (:data:`TOP_LEVEL_HELP`); ``mulan-cli SUBCOMMAND --help`` lists a subcommand's options.

Errors end the run with one line, ``error: ...``, exit status 2; ``--debug`` or ``MULAN_DEBUG=1`` raises them with
their traceback instead (:func:`main`).

The modules, one concept each:

- :mod:`mulan.cli.app`: :class:`MulanCLI` (the ``fit`` hooks: checks before training, resuming, the test after
  it and its :func:`summary_line`), :func:`build_cli` and :func:`main`;
- :mod:`mulan.cli.parsing`: the checkpoint-first parsing and building that :class:`MulanCLI` extends;
- :mod:`mulan.cli.checkpoint_config`: the configuration saved in a checkpoint and :func:`model_differences`;
- :mod:`mulan.cli.errors`: errors as one line, the debug switch, rename hints for 0.1 configurations.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on first use (PEP 562): `mulan-cli --help` answers without importing torch or Lightning
    from mulan.cli.app import MulanCLI, build_cli, summary_line
    from mulan.cli.checkpoint_config import EVALUATION_OPTIONS, model_differences
    from mulan.cli.errors import DEBUG_ENV, RENAMED, MulanParser, error_line, library_error, usage_error_line
    from mulan.cli.parsing import EVAL_SUBCOMMANDS, LIGHTNING_CKPT_NAMES, CheckpointFirstCLI

_HOMES: dict[str, str] = {
    **dict.fromkeys(["MulanCLI", "build_cli", "summary_line"], "mulan.cli.app"),
    **dict.fromkeys(["EVALUATION_OPTIONS", "model_differences"], "mulan.cli.checkpoint_config"),
    **dict.fromkeys(
        ["DEBUG_ENV", "RENAMED", "MulanParser", "error_line", "library_error", "usage_error_line"], "mulan.cli.errors"
    ),
    **dict.fromkeys(["EVAL_SUBCOMMANDS", "LIGHTNING_CKPT_NAMES", "CheckpointFirstCLI"], "mulan.cli.parsing"),
}

SUBCOMMANDS = {
    "fit": "train a model (add --test_after_fit true to test the best checkpoint after it)",
    "validate": "the bound of a checkpoint on the validation split (needs --ckpt_path)",
    "test": "the bound of a checkpoint on the test split, per term with its standard error (needs --ckpt_path)",
    "predict": "draw samples from a checkpoint and write them with a picture grid (needs --ckpt_path)",
}
"""LightningCLI's subcommands, as the top-level help lists them (``tests/test_run_defaults.py`` holds them equal)."""

TOP_LEVEL_HELP = (
    "usage: mulan-cli [-h] [--version] {fit,validate,test,predict} ...\n\n"
    "Likelihood-trained diffusion models with learned noise (MuLAN, VDM and their relatives), on Lightning.\n\n"
    "subcommands:\n" + "".join(f"  {name:<10}{text}\n" for name, text in SUBCOMMANDS.items()) + "\n"
    "mulan-cli SUBCOMMAND --help lists its options (the trainer's, the model's, the data's and mulan's own).\n\n"
    "options:\n"
    "  -h, --help  show this help and exit\n"
    "  --version   print mulan's version and exit\n"
    "  --debug     raise errors with their traceback instead of one line (also: MULAN_DEBUG=1)\n\n"
    "example:\n"
    "  mulan-cli fit --config configs/demo_digits.yaml\n"
    "  mulan-cli test --ckpt_path runs/demo_mulan/version_0/checkpoints/last.ckpt\n"
)
"""What ``mulan-cli``, ``mulan-cli -h`` and ``mulan-cli --help`` print: a static text, so that it comes in well under
a second (Lightning and torch take several seconds to import)."""


def __getattr__(name: str) -> Any:
    """A public name from its module, imported on first use (then cached on the package)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


def main(args: list[str] | None = None) -> None:
    """Entry point of ``mulan-cli`` and ``python -m mulan``; ``args`` as on the command line.

    With no arguments, ``-h``/``--help`` alone or ``--version`` it answers from static text, without importing
    torch or Lightning (no arguments: the help, then exit status 2, as a missing subcommand is a usage error).
    Otherwise it runs :func:`mulan.cli.app.main`: an error ends the run with one line on stderr, ``error: ...``
    (the library's own message: what is wrong, where, and how to fix it), and exit status 2. ``--debug``
    (anywhere on the line) or the environment variable ``MULAN_DEBUG=1`` raises it with its traceback instead."""
    argv = list(sys.argv[1:] if args is None else args)
    given = [arg for arg in argv if arg != "--debug"]
    if given == ["--version"]:
        from mulan import __version__

        sys.stdout.write(f"mulan-cli {__version__}\n")
        return
    if not given or set(given) <= {"-h", "--help"}:
        sys.stdout.write(TOP_LEVEL_HELP)
        if not given:
            sys.stderr.write("error: give a subcommand: " + ", ".join(SUBCOMMANDS) + "\n")
            raise SystemExit(2)
        return
    from mulan.cli.app import main as run

    run(argv)


__all__ = [
    "DEBUG_ENV",
    "EVALUATION_OPTIONS",
    "EVAL_SUBCOMMANDS",
    "LIGHTNING_CKPT_NAMES",
    "RENAMED",
    "SUBCOMMANDS",
    "TOP_LEVEL_HELP",
    "CheckpointFirstCLI",
    "MulanCLI",
    "MulanParser",
    "build_cli",
    "error_line",
    "library_error",
    "main",
    "model_differences",
    "summary_line",
    "usage_error_line",
]
