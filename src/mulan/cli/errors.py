"""``mulan-cli``'s errors as one line: ``error: <the library's own message>``, exit status 2.

The outermost message of an exception chain is found past jsonargparse's wrappers (:func:`library_error`); an error
not raised by mulan gets its type and how to see the traceback (:func:`error_line`); jsonargparse's multi-line usage
dump is reduced to the option and the complaint (:func:`usage_error_line`, :class:`MulanParser`); a configuration
written for mulan 0.1 gets a rename hint (:func:`renamed_hint`). ``--debug`` or ``MULAN_DEBUG=1`` raises instead
(:func:`mulan.cli.main`).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

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

MULAN_DIR = Path(__file__).parents[1]
"""The mulan package's folder: an error raised from a file under it is the library's own."""


def debug_requested(argv: list[str]) -> bool:
    """Whether errors should be raised with their traceback: ``--debug`` in ``argv`` or ``MULAN_DEBUG`` set (not 0)."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


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
    return _raise_site(error).startswith(str(MULAN_DIR) + os.sep)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())


def error_line(error: BaseException) -> str:
    """One line for ``error: ...``: the library's own message as it is; any other error (a bug, or a condition the
    library does not check) with its type and how to see the traceback."""
    error = library_error(error)
    text = one_line(str(error)) or type(error).__name__
    if _raised_by_mulan(error):
        return text
    return f"{type(error).__name__}: {text} (unexpected; {DEBUG_HINT})"


def exit_with_error(message: str) -> NoReturn:
    """End the run: ``error: <message>`` as one line on stderr, exit status 2."""
    sys.stderr.write(f"error: {one_line(message)}\n")
    raise SystemExit(2)


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
    detail = useful[-1] if useful else one_line(message)
    detail = re.sub(r"^Type .*? expects a function or a callable class: ", "", detail)
    detail = re.sub(r"\.? Got value: Namespace\(.*$", "", detail).rstrip(".")
    where = ".init_args.".join(keys)
    return f"{where}: {detail}" if where and not detail.startswith(where) else detail


def renamed_hint(text: str) -> str:
    """What to rename, for a configuration written for mulan 0.1 (empty when nothing matches)."""
    hits = [f"{old!r} -> {new!r}" for old, new in RENAMED.items() if old in text]
    return ("; this looks like a mulan 0.1 configuration, rename: " + ", ".join(hits)) if hits else ""


def config_texts(argv: list[str]) -> list[str]:
    """The text of every ``--config`` file named in ``argv`` (for rename hints)."""
    texts = []
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path and Path(path).is_file():
            texts.append(Path(path).read_text())
    return texts


class MulanParser(LightningArgumentParser):
    """LightningCLI's parser with jsonargparse's usage dump reduced to one line: ``error: <option>: <problem>``."""

    hint = ""
    """Appended to the error (a rename hint for an old configuration); set while ``mulan-cli`` parses."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"error: {usage_error_line(message)}{MulanParser.hint}\n")
        raise SystemExit(2)
