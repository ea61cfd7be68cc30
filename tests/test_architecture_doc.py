"""docs/architecture.md is drawn from the code as it is: every module of ``src/mulan`` is named there, every
``mulan.…`` name it gives exists, and its "Where do I add X" table has one row per extension point, each citing
examples and tests that exist.

The page's convention is the dotted import path (``mulan.lightning.loading``; a package by its own name,
``mulan.processes.auxiliary``; the package's ``__init__`` is ``mulan``). A name ``mulan.a.b.C.d`` is checked up to
the first part after its longest module prefix: ``C`` must be defined or imported at the top level of ``mulan.a.b``.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mulan"
PAGE = ROOT / "docs" / "architecture.md"
WHERE_HEADING = "## Where do I add X"
EXTENSION_POINTS = (
    "process",
    "parameterisation",
    "time sampler",
    "latent",
    "denoiser",
    "data module",
    "metric",
    "sampler",
)
DOTTED = re.compile(r"(?<![\w.])mulan(?:\.\w+)*")
PATH = re.compile(r"(?<![\w.])mulan/[\w/]*\w(?:\.py)?")
CITED = re.compile(r"`((?:tests|examples)/[\w/]+\.py)(?:::(\w+))?`|(?<=, )`(test_\w+)`")


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module and package under ``root``, dotted (``mulan.a.b`` for ``a/b.py`` or ``a/b/__init__.py``)."""
    found = {}
    for file in sorted(root.rglob("*.py")):
        parts = [root.name, *file.relative_to(root).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


@cache
def top_level_names(file: Path) -> frozenset[str]:
    """The names a module defines or imports at its top level (classes, functions, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(file.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return frozenset(names)


def stale_names(text: str, known: dict[str, Path]) -> list[str]:
    """Every ``mulan.…`` name of ``text`` that names no module, nor a top-level name of one; every ``mulan/…`` path
    that is no file or folder of the package."""
    stale = []
    for name in sorted(set(DOTTED.findall(text))):
        parts = name.split(".")
        while ".".join(parts) not in known:
            parts.pop()
        rest = name.split(".")[len(parts) :]
        if rest and rest[0] not in top_level_names(known[".".join(parts)]):
            stale.append(name)
    for path in sorted(set(PATH.findall(text))):
        if not (PACKAGE.parent / path).exists():
            stale.append(path)
    return stale


def missing_modules(text: str, known: dict[str, Path]) -> list[str]:
    """The modules of ``known`` that ``text`` never names as a whole dotted name."""
    return sorted(set(known) - set(DOTTED.findall(text)))


def where_table(text: str) -> dict[str, list[str]]:
    """The rows of the "Where do I add X" table: first cell (lower case) -> all cells."""
    if WHERE_HEADING not in text:
        raise AssertionError(f"docs/architecture.md has no '{WHERE_HEADING}' section: add it with its table")
    section = text.split(WHERE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows[2:]]  # header, rule
    return {row[0].lower(): row for row in cells}


def missing_citations(row: list[str]) -> list[str]:
    """The example and test files (and test functions) a row cites that do not exist. A bare ``test_…`` after a
    comma belongs to the last test file cited before it."""
    missing, last_file = [], None
    for file, function, bare in CITED.findall(" | ".join(row)):
        if file:
            last_file = ROOT / file
            if not last_file.is_file():
                missing.append(file)
                continue
        function = function or bare
        if function and (last_file is None or f"def {function}(" not in last_file.read_text(encoding="utf-8")):
            missing.append(f"{last_file}::{function}")
    return missing


# ------------------------------------------------------------------------------------------------ tests
def test_every_module_under_src_is_named_on_the_architecture_page() -> None:
    known = modules()
    assert {"mulan", "mulan.lightning.loading", "mulan.processes.auxiliary.fixed", "mulan.cli.app"} <= set(known)
    missing = missing_modules(PAGE.read_text(encoding="utf-8"), known)
    assert missing == [], f"docs/architecture.md does not name {missing}: add them to its layer table"


def test_every_name_on_the_architecture_page_exists() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert len(set(DOTTED.findall(text))) > 60  # the page was read
    stale = stale_names(text, modules())
    assert stale == [], f"docs/architecture.md names {stale}, which do not exist: update or remove them"


def test_the_where_do_i_add_table_has_one_row_per_extension_point_citing_files_that_exist() -> None:
    table = where_table(PAGE.read_text(encoding="utf-8"))
    assert tuple(table) == EXTENSION_POINTS
    for point, row in table.items():
        assert len(row) == 5 and all(row), f"the '{point}' row needs five cells: put it in, contract, copy, test"
        assert CITED.search(row[4]), f"the '{point}' row cites no test"
        assert missing_citations(row) == [], f"the '{point}' row cites {missing_citations(row)}, which do not exist"


@pytest.mark.parametrize("module", ["mulan.lightning.loading", "mulan.processes.auxiliary", "mulan.__main__"])
def test_the_checks_see_a_module_left_out(module: str) -> None:
    """The page with every mention of ``module`` (and of nothing else) removed is reported as missing it."""
    text = re.sub(re.escape(module) + r"(?![\w.])", "", PAGE.read_text(encoding="utf-8"))
    assert missing_modules(text, modules()) == [module]


@pytest.mark.parametrize(
    ("added", "reported"),
    [
        ("`mulan.lightning.fake_module`", "mulan.lightning.fake_module"),
        ("`mulan.processes.NoSuchProcess`", "mulan.processes.NoSuchProcess"),
        ("`mulan.ode.solve_at`", "mulan.ode.solve_at"),  # moved to mulan.ode_solver
        ("`src/mulan/cli.py`", "mulan/cli.py"),  # a package now
    ],
)
def test_the_checks_see_a_name_that_does_not_exist(added: str, reported: str) -> None:
    text = PAGE.read_text(encoding="utf-8") + f"\n{added}\n"
    assert stale_names(text, modules()) == [reported]


def test_the_checks_see_a_missing_row_and_a_missing_test() -> None:
    text = PAGE.read_text(encoding="utf-8")
    without_metric = "\n".join(line for line in text.splitlines() if not line.startswith("| metric |"))
    assert "metric" not in where_table(without_metric)
    row = where_table(text)["sampler"]
    assert missing_citations(row) == []
    renamed = [cell.replace("test_ancestral_many_steps", "test_no_such") for cell in row]
    assert missing_citations(renamed) == [f"{ROOT / 'tests/test_sampling.py'}::test_no_such_variance_matches_data"]


OLD_PATHS = frozenset({"mulan.schedules", "mulan.lightning.callbacks", "mulan.__main__"})
"""Modules the API reference leaves out: old paths that only re-export (for saved configs), and the entry point."""


def test_every_module_has_its_api_reference_and_every_reference_resolves() -> None:
    """Each module but :data:`OLD_PATHS` has a ``::: module`` directive in docs/api/*.md, and each directive names a
    module (mkdocs --strict would fail later, and less clearly, on one that does not)."""
    directives = {
        line.removeprefix(":::").strip()
        for page in sorted((ROOT / "docs" / "api").glob("*.md"))
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith(":::")
    }
    known = modules()
    assert sorted(set(known) - OLD_PATHS - directives) == [], "add a '::: module' line to docs/api/*.md"
    assert sorted(directives - set(known)) == [], "docs/api/*.md names a module that does not exist"
