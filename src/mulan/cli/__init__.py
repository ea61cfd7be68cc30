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

The modules, one concept each:

- :mod:`mulan.cli.app`: :class:`MulanCLI` (the ``fit`` hooks: checks before training, resuming, the test after
  it and its :func:`summary_line`), :func:`build_cli` and :func:`main`;
- :mod:`mulan.cli.parsing`: the checkpoint-first parsing and building that :class:`MulanCLI` extends;
- :mod:`mulan.cli.checkpoint_config`: the configuration saved in a checkpoint and :func:`model_differences`;
- :mod:`mulan.cli.errors`: errors as one line, the debug switch, rename hints for 0.1 configurations.
"""

from mulan.cli.app import MulanCLI, build_cli, main, summary_line
from mulan.cli.checkpoint_config import EVALUATION_OPTIONS, model_differences
from mulan.cli.errors import DEBUG_ENV, RENAMED, MulanParser, error_line, library_error, usage_error_line
from mulan.cli.parsing import EVAL_SUBCOMMANDS, LIGHTNING_CKPT_NAMES, CheckpointFirstCLI

__all__ = [
    "DEBUG_ENV",
    "EVALUATION_OPTIONS",
    "EVAL_SUBCOMMANDS",
    "LIGHTNING_CKPT_NAMES",
    "RENAMED",
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
