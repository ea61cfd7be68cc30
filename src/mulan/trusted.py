"""Which classes loading a saved configuration may build: :func:`check_class_paths`, applied before anything is
imported.

Every class path in a checkpoint's or an export's configuration must be one of mulan's own classes (a class
*defined* in a ``mulan`` module, or imported there from one: checked from mulan's source with :mod:`ast`, without
importing anything), a torch optimiser or learning-rate scheduler (``torch.optim...``), Lightning's
``ReduceLROnPlateau`` and instantiator, or a class the user trusts by name: ``trusted=["mypackage.MyDenoiser"]`` (or
a module prefix ending in ``.``: ``trusted=["mypackage."]``), ``mulan-cli --trusted_classes ...``, or the
environment variable ``MULAN_TRUSTED_CLASSES`` (comma-separated, same forms). Anything else is refused in one line
that names the class, without importing its module.

This module must stay at the top of the ``mulan`` package: it finds mulan's source next to itself.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mulan.checkpoints import REEXPORT

__all__ = ["TRUSTED_ENV", "check_class_paths"]

TRUSTED_ENV = "MULAN_TRUSTED_CLASSES"
"""Environment variable: comma-separated class paths (``pkg.mod.Class``) or module prefixes (``pkg.``) that
loading may instantiate besides mulan's own classes."""
IMPORT_PATH_KEYS = ("class_path", "_class_path", "_instantiator")
"""Keys whose string value jsonargparse or Lightning imports: ``class_path`` (a component), ``_class_path``
(the saved module or data module) and ``_instantiator`` (the function Lightning calls to build them)."""
LIGHTNING_ALLOWED = frozenset({"lightning.pytorch.cli.ReduceLROnPlateau", "lightning.pytorch.cli.instantiate_module"})
"""Lightning objects that configurations saved by ``mulan-cli fit`` may name (exact paths)."""
TORCH_OPTIM = "torch.optim"


def _trusted_entries(trusted: Iterable[str]) -> list[str]:
    """The user's trusted entries (``trusted`` and :data:`TRUSTED_ENV`), validated: each a dotted path of Python
    identifiers, optionally ending in ``.`` (a module prefix)."""
    entries = [str(entry).strip() for entry in trusted]
    entries += [entry.strip() for entry in os.environ.get(TRUSTED_ENV, "").split(",")]
    entries = [entry for entry in entries if entry]
    for entry in entries:
        if not all(part.isidentifier() for part in entry.removesuffix(".").split(".")):
            raise ValueError(
                f"trusted class entry {entry!r} (from trusted= or {TRUSTED_ENV}) is not a class path such as "
                "'mypackage.models.MyDenoiser' nor a module prefix such as 'mypackage.': fix or remove it."
            )
    return entries


def _is_trusted(path: str, entries: list[str]) -> bool:
    """``path`` equals an entry, or starts with an entry that ends in ``.`` (so ``pkg.`` never matches ``pkgx``)."""
    return any(path == entry or (entry.endswith(".") and path.startswith(entry)) for entry in entries)


def _mulan_source(module: list[str]) -> Path | None:
    """The source file of the mulan module ``module`` (its dotted parts, ``mulan`` first), or None; nothing is
    imported."""
    base = Path(__file__).resolve().parent  # the mulan package
    for part in module[1:]:
        base = base / part
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file() and len(module) > 1:
        return base.with_suffix(".py")
    return None


@functools.lru_cache(maxsize=64)
def _parse(source: Path) -> ast.Module:
    """The syntax tree of one of mulan's source files (read once)."""
    return ast.parse(source.read_text(encoding="utf-8"), filename=str(source))


def _defined_in_mulan(path: str, depth: int = 0) -> bool:
    """Whether ``path`` (``mulan.<module>.<Name>``) names a class defined in mulan's source: ``<Name>`` is a
    ``class`` statement at the top level of that module, or is imported there from a mulan module where it is
    (followed to its definition). Read from the source with :mod:`ast`, so nothing is imported or run; paths
    that reach an attribute of a class, a module, a function or anything imported from elsewhere are not."""
    parts = path.split(".")
    if depth > 8 or len(parts) < 2 or parts[0] != "mulan" or any(p.startswith("__") for p in parts):
        return False
    source = _mulan_source(parts[:-1])
    if source is None:
        return False
    name, package = parts[-1], parts[:-1] if source.name == "__init__.py" else parts[:-2]
    binding: tuple[str, str] | None = None  # the last top-level statement that binds `name`
    for node in _top_level(_parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            binding = ("class", "")
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    if node.level:  # relative import: from the package `level - 1` levels above this one
                        anchor = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                        origin = ".".join([*anchor, *([node.module] if node.module else [])])
                    else:
                        origin = node.module or ""
                    binding = ("import", f"{origin}.{alias.name}")
        elif isinstance(node, ast.Import | ast.Assign | ast.AnnAssign | ast.FunctionDef | ast.AsyncFunctionDef):
            targets = _bound_names(node)
            if name in targets:
                binding = ("other", "")
    if binding is None or binding[0] == "other":
        return False
    if binding[0] == "import":
        return _defined_in_mulan(binding[1], depth + 1)
    loaded = sys.modules.get(".".join(parts[:-1]))  # also check the live object when its module is loaded already
    if loaded is not None:
        obj = vars(loaded).get(name)
        return inspect.isclass(obj) and (obj.__module__ == "mulan" or obj.__module__.startswith("mulan."))
    return True


def _top_level(tree: ast.Module) -> list[ast.stmt]:
    """The module's top-level statements; in a module that defines ``__getattr__`` (PEP 562: names imported on
    first use, as :mod:`mulan` does), the imports of its ``if TYPE_CHECKING:`` block count as top-level too, since
    they name what ``__getattr__`` returns."""
    body = list(tree.body)
    if not any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in body):
        return body
    statements: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            statements += [n for n in node.body if isinstance(n, ast.ImportFrom)]
        else:
            statements.append(node)
    return statements


def _bound_names(node: ast.stmt) -> set[str]:
    """The names a top-level ``import``, assignment or ``def`` binds."""
    if isinstance(node, ast.Import):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]  # type: ignore[attr-defined]
    return {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}


def _torch_optim_class(path: str) -> bool:
    """Whether ``path`` names a torch optimiser or learning-rate scheduler class in an already imported
    ``torch.optim`` module (``torch.optim.Adam``, ``torch.optim.lr_scheduler.CosineAnnealingLR``)."""
    module_name, _, name = path.rpartition(".")
    if not (module_name == TORCH_OPTIM or module_name.startswith(TORCH_OPTIM + ".")):
        return False
    module = sys.modules.get(module_name)  # torch is imported by mulan; nothing new is imported here
    obj = vars(module).get(name) if module is not None else None
    bases = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return inspect.isclass(obj) and issubclass(obj, bases) and obj.__module__.startswith(TORCH_OPTIM + ".")


def _is_import_path(value: str) -> bool:
    """Whether jsonargparse could take the string ``value`` for an import path: two or more dotted identifiers
    whose first names an importable top-level module (found without importing it)."""
    parts = value.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        return False
    try:
        return parts[0] in sys.modules or importlib.util.find_spec(parts[0]) is not None
    except (ImportError, ValueError):
        return True


def _allowed(path: str, entries: list[str]) -> bool:
    return (
        _is_trusted(path, entries) or path in LIGHTNING_ALLOWED or _defined_in_mulan(path) or _torch_optim_class(path)
    )


def check_class_paths(config: Any, source: str, trusted: Iterable[str] = ()) -> None:
    """Refuse a saved configuration that names a class loading should not build, before anything is imported.

    Walks ``config`` (nested dicts and lists) for the values of ``class_path``, ``_class_path`` and
    ``_instantiator``, and for any other string that jsonargparse would take for an import path (such as
    ``"denoiser": "pkg.mod.factory"``). Each must be: a class defined in mulan (``mulan.UNet``,
    ``mulan.lightning.optim.AdamW``; a ``mulan.`` path that reaches anything else, such as a module mulan imports,
    is refused); a torch optimiser or scheduler class (``torch.optim.Adam``); Lightning's ``ReduceLROnPlateau``
    or ``instantiate_module``; or trusted by the user: an entry of ``trusted`` or of the environment variable
    ``MULAN_TRUSTED_CLASSES`` (comma-separated) that equals it, or that ends in ``.`` and begins it.

    Raises:
        ValueError: one line naming the first refused path, where it is in the configuration, ``source`` (the
            file it came from) and how to allow it; also for a malformed trusted entry.
    """
    entries = _trusted_entries(trusted)

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                place = f"{where}.{key}" if where else str(key)
                if key in IMPORT_PATH_KEYS and not isinstance(item, str):
                    raise ValueError(
                        f"{source}: {place} must be a class path string, got {type(item).__name__}; the file's "
                        f"configuration is not one that mulan-cli fit saves. {REEXPORT}"
                    )
                walk(item, place)
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")
        elif isinstance(value, str) and (where.rsplit(".", 1)[-1] in IMPORT_PATH_KEYS or _is_import_path(value)):
            if not _allowed(value, entries):
                raise ValueError(
                    f"{source}: refusing to import {value!r} (at {where}): loading builds only mulan's own classes, "
                    f"torch optimisers/schedulers and classes you trust. If you trust this file, allow it with "
                    f"load_model(..., trusted=[{value!r}]), mulan-cli --trusted_classes {value} or "
                    f"{TRUSTED_ENV}={value}."
                )

    walk(config, "")
