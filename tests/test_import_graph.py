"""The import graph of ``src/mulan``, read from the source: no cycle, and no module imports a layer above its own.

Every ``import`` and ``from ... import`` counts, at module level or inside a function (a lazy import is still an
arrow), relative or absolute. The layers, lowest first, are :data:`LAYERS`; a module may import its own layer or
lower ones. Below the Lightning layer nothing imports ``lightning`` (or ``mulan.lightning``, ``mulan.cli``), and the
compatibility modules that only re-export old class paths for saved configurations (:data:`SHIMS`) are imported by
no module of the package.

Run as a script to print the graph's size (modules, arrows, layers, longest chain, cycles) of any source tree:
``python tests/test_import_graph.py [path/to/src/mulan]``.
"""

from __future__ import annotations

import ast
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mulan"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("mulan.utils", "mulan.elbo", "mulan.data", "mulan.checkpoints", "mulan.trusted")),
    ("processes", ("mulan.processes",)),
    ("components", ("mulan.networks", "mulan.latents", "mulan.parameterisation", "mulan.time_sampling")),
    ("model", ("mulan.model",)),
    ("evaluation", ("mulan.ode", "mulan.ode_solver", "mulan.likelihood", "mulan.sampling", "mulan.figures")),
    ("api", ("mulan",)),
    ("export", ("mulan.export",)),
    ("lightning", ("mulan.lightning",)),
    ("cli", ("mulan.cli", "mulan.__main__")),
    ("compat", ("mulan.schedules",)),
]
"""Lowest first. A module belongs to the layer of the longest entry that equals it or is a package above it
(``mulan.processes`` covers ``mulan.processes.diagonal``; ``mulan`` alone is the package's ``__init__``)."""
SHIMS = frozenset({"mulan.schedules"})
"""Old import paths kept for saved configurations: plain re-exports that nothing in the package imports."""
LIGHTNING_LAYER = "lightning"
FORBIDDEN_BELOW_LIGHTNING = ("lightning", "pytorch_lightning", "mulan.lightning", "mulan.cli")


@dataclass
class Graph:
    """The modules of a package (dotted names), its arrows ``importer -> imported`` (both modules of the package)
    and, per module, every other top-level name it imports (third-party and standard library), with line numbers."""

    root: Path
    modules: set[str] = field(default_factory=set)
    arrows: dict[tuple[str, str], int] = field(default_factory=dict)  # arrow -> first line
    external: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> {dotted import: line}

    def successors(self, module: str) -> list[str]:
        return sorted(b for (a, b) in self.arrows if a == module)


def module_name(root: Path, file: Path) -> str:
    """``mulan.a.b`` for ``<root>/a/b.py``; ``mulan.a`` for ``<root>/a/__init__.py``."""
    parts = [root.name, *file.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def build_graph(root: Path = PACKAGE) -> Graph:
    """The import graph of the package at ``root`` (a folder with ``__init__.py``), from its source with ``ast``."""
    files = {module_name(root, file): file for file in sorted(root.rglob("*.py"))}
    graph = Graph(root, modules=set(files))

    def resolve(dotted: str) -> str | None:
        """The package's module that ``dotted`` names, or the longest module above it; None outside the package."""
        parts = dotted.split(".")
        while parts:
            if ".".join(parts) in files:
                return ".".join(parts)
            parts.pop()
        return None

    for name, file in files.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        external = graph.external.setdefault(name, {})
        targets: list[tuple[str, int]] = []
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
            if isinstance(node, ast.Import):
                targets += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    origin = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    origin = node.module or ""
                # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
                targets += [(f"{origin}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
                targets.append((origin, node.lineno))
        for dotted, line in targets:
            target = resolve(dotted)
            if target is None:
                external.setdefault(dotted, line)
            elif target != name:
                graph.arrows.setdefault((name, target), line)
    # `from pkg import sub` also listed `pkg` itself: keep that arrow only when a name (not a module) is imported
    return _drop_package_arrows_of_submodule_imports(root, files, graph)


def _drop_package_arrows_of_submodule_imports(root: Path, files: dict[str, Path], graph: Graph) -> Graph:
    """Remove ``a -> pkg`` where every ``from pkg import ...`` in ``a`` imports submodules of ``pkg`` only (such a
    statement runs ``pkg/__init__`` as any import of ``pkg.sub`` does, which is not an arrow to ``pkg``)."""
    for name, file in files.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        names_from: dict[str, list[str]] = {}
        direct: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    origin = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    origin = node.module or ""
                names_from.setdefault(origin, []).extend(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                direct.update(alias.name for alias in node.names)
        for origin, names in names_from.items():
            if origin in files and origin not in direct and all(f"{origin}.{n}" in files for n in names):
                graph.arrows.pop((name, origin), None)
    return graph


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of ``module``'s layer (longest matching entry); KeyError when it has none."""
    best: tuple[int, int] | None = None  # (length of the entry, layer index)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            exact_package = entry == "mulan" and module == "mulan"
            if (entry != "mulan" and (module == entry or module.startswith(entry + "."))) or exact_package:
                if best is None or len(entry) > best[0]:
                    best = (len(entry), index)
    if best is None:
        raise KeyError(module)
    return best[1]


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; a self-import counts."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph.modules) + 100))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.successors(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph.modules):
        if v not in index:
            visit(v)
    return found


def longest_chain(graph: Graph) -> list[str]:
    """The longest path of imports ``a -> b -> ...`` (modules), over the graph with each cycle merged into one node
    (so it is defined on a graph with cycles too; a merged cycle counts as one step)."""
    merged = {m: m for m in graph.modules}
    for component in cycles(graph):
        for m in component:
            merged[m] = "{" + ", ".join(component) + "}"
    successors: dict[str, set[str]] = {}
    for a, b in graph.arrows:
        if merged[a] != merged[b]:
            successors.setdefault(merged[a], set()).add(merged[b])
    best: dict[str, list[str]] = {}

    def chain(v: str) -> list[str]:
        if v not in best:
            tails = [chain(w) for w in sorted(successors.get(v, ()))]
            best[v] = [v, *max(tails, key=len, default=[])]
        return best[v]

    return max((chain(v) for v in sorted(set(merged.values()))), key=len, default=[])


def violations(graph: Graph) -> list[str]:
    """Every broken rule, one line each: a module with no layer, an upward arrow, an import of a shim, a module
    below the Lightning layer importing Lightning (or mulan's Lightning layer or CLI), and every cycle."""
    problems = []
    for module in sorted(graph.modules):
        try:
            layer_of(module)
        except KeyError:
            problems.append(f"{module} has no layer: add it to LAYERS in tests/test_import_graph.py")
    lightning = [name for name, _ in LAYERS].index(LIGHTNING_LAYER)
    for (a, b), line in sorted(graph.arrows.items()):
        if b in SHIMS:
            problems.append(f"{a}:{line} imports {b}, an old path kept for saved configs; import its new home")
        elif a in graph.modules and b in graph.modules and a not in SHIMS:
            la, lb = _safe_layer(a), _safe_layer(b)
            if la is not None and lb is not None and lb > la:
                problems.append(f"{a}:{line} imports {b} upwards (layer {LAYERS[la][0]} -> {LAYERS[lb][0]})")
    for module in sorted(graph.modules):
        layer = _safe_layer(module)
        if layer is None or layer >= lightning:
            continue
        imported = {
            **graph.external.get(module, {}),
            **{b: line for (a, b), line in graph.arrows.items() if a == module},
        }
        for dotted, line in sorted(imported.items()):
            if any(dotted == f or dotted.startswith(f + ".") for f in FORBIDDEN_BELOW_LIGHTNING):
                problems.append(f"{module}:{line} imports {dotted}, but the {LAYERS[layer][0]} layer is pure torch")
    problems += [f"import cycle: {' <-> '.join(component)}" for component in cycles(graph)]
    return problems


def _safe_layer(module: str) -> int | None:
    try:
        return layer_of(module)
    except KeyError:
        return None


def summary(graph: Graph) -> str:
    """One paragraph: modules (and packages among them), arrows, layers in use, the longest chain, cycles."""
    packages = sum(1 for m in graph.modules if (graph.root.parent / m.replace(".", "/") / "__init__.py").exists())
    chain = longest_chain(graph)
    used = sorted({layer for m in graph.modules if (layer := _safe_layer(m)) is not None})
    found = cycles(graph)
    return (
        f"{len(graph.modules)} modules ({packages} of them packages), {len(graph.arrows)} arrows, "
        f"{len(used)} layers in use; longest chain {len(chain)} modules: {' -> '.join(chain)}; "
        f"cycles: {found or 'none'}"
    )


def collapsed(graph: Graph) -> Graph:
    """The graph with every subpackage of the top-level package merged into one node (``mulan.processes.base`` ->
    ``mulan.processes``): the modules and packages a reader of ``src/mulan`` sees first."""

    def top(module: str) -> str:
        return ".".join(module.split(".")[:2])

    merged = Graph(graph.root, modules={top(m) for m in graph.modules})
    for (a, b), line in graph.arrows.items():
        if top(a) != top(b):
            merged.arrows.setdefault((top(a), top(b)), line)
    return merged


# ------------------------------------------------------------------------------------------------ tests
def test_the_package_has_no_import_cycle_and_no_upward_import() -> None:
    graph = build_graph()
    print(summary(graph))
    assert graph.modules >= {"mulan.export", "mulan.checkpoints", "mulan.processes.schedules", "mulan.lightning.task"}
    assert len(graph.arrows) > 50  # the graph was read (an empty graph breaks no rule)
    assert violations(graph) == []


def test_the_rules_see_a_lazy_upward_import_a_cycle_and_a_shim_import(tmp_path: Path) -> None:
    """The same checks on a copy of the package with a lazy ``from mulan.lightning...`` inside a core function, a
    cycle through a relative import, and an import of the old ``mulan.schedules`` path: each is reported."""
    copy = tmp_path / "mulan"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "checkpoints.py").open("a") as file:
        file.write("\n\ndef _lazy():\n    from mulan.lightning.checkpoint_io import LastCheckpoint\n\n    return 0\n")
    with (copy / "utils.py").open("a") as file:
        file.write("\n\ndef _lazy():\n    from . import elbo\n\n    return elbo\n")
    with (copy / "elbo.py").open("a") as file:
        file.write("\n\ndef _lazy():\n    from mulan.utils import float32_region\n\n    return float32_region\n")
    with (copy / "model.py").open("a") as file:
        file.write("\n\ndef _lazy():\n    import mulan.schedules\n\n    return mulan.schedules\n")
    problems = violations(build_graph(copy))
    assert any(p.startswith("mulan.checkpoints:") and "mulan.lightning.checkpoint_io upwards" in p for p in problems)
    assert any(p.startswith("mulan.checkpoints:") and "the core layer is pure torch" in p for p in problems)
    assert "import cycle: mulan.elbo <-> mulan.utils" in problems
    assert any(p.startswith("mulan.model:") and "imports mulan.schedules, an old path" in p for p in problems)
    assert "import cycle: mulan.checkpoints <-> mulan.lightning.checkpoint_io" in problems  # it imports the core
    assert len(problems) == 5


def test_a_new_module_without_a_layer_is_reported(tmp_path: Path) -> None:
    copy = tmp_path / "mulan"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "newthing.py").write_text("from mulan import elbo\n")
    assert violations(build_graph(copy)) == [
        "mulan.newthing has no layer: add it to LAYERS in tests/test_import_graph.py"
    ]


def test_the_graph_reads_imports_as_python_resolves_them(tmp_path: Path) -> None:
    """Relative imports, ``from pkg import submodule``, ``import a.b`` and imports inside functions, on a tiny
    package whose arrows are known."""
    root = tmp_path / "mulan"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from mulan.a import A\n")
    (root / "a.py").write_text("A = 1\n")
    (root / "b.py").write_text("from . import a\nimport json\n\ndef f():\n    import mulan.sub.c\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "c.py").write_text("from ..a import A\nfrom mulan.sub import d\nfrom mulan import A as B\n")
    (root / "sub" / "d.py").write_text("import lightning.pytorch as L\n")
    graph = build_graph(root)
    assert graph.modules == {"mulan", "mulan.a", "mulan.b", "mulan.sub", "mulan.sub.c", "mulan.sub.d"}
    assert set(graph.arrows) == {
        ("mulan", "mulan.a"),
        ("mulan.b", "mulan.a"),
        ("mulan.b", "mulan.sub.c"),
        ("mulan.sub.c", "mulan.a"),
        ("mulan.sub.c", "mulan.sub.d"),
        ("mulan.sub.c", "mulan"),
    }
    assert set(graph.external["mulan.b"]) == {"json"} and set(graph.external["mulan.sub.d"]) == {"lightning.pytorch"}
    assert longest_chain(graph) == ["mulan.b", "mulan.sub.c", "mulan", "mulan.a"]
    assert cycles(graph) == []


ONE_HOME = {"GAMMA_MIN": "mulan.processes.base", "GAMMA_MAX": "mulan.processes.base", "DECODE_MODES": "mulan.elbo"}
"""Constants written once: where each is assigned (everywhere else it is imported)."""


def test_each_constant_and_the_256_way_decoder_are_written_once() -> None:
    """:data:`ONE_HOME`'s constants are assigned in one module each, and only :mod:`mulan.elbo` builds the
    decoder's logits (the processes and samplers call its ``decode_bins`` and ``check_decode_mode``)."""
    assigned: dict[str, set[str]] = {name: set() for name in ONE_HOME}
    logits_users: set[str] = set()
    for file in sorted(PACKAGE.rglob("*.py")):
        module = module_name(PACKAGE, file)
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for name in (n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)):
                    if name in assigned:
                        assigned[name].add(module)
            elif isinstance(node, ast.Call):
                callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if callee == "decoder_logits":
                    logits_users.add(module)
    assert assigned == {name: {home} for name, home in ONE_HOME.items()}
    assert logits_users == {"mulan.elbo"}


@pytest.mark.parametrize("module", ["mulan.processes.schedules", "mulan.checkpoints", "mulan.trusted", "mulan.elbo"])
def test_moved_homes_sit_below_their_users(module: str) -> None:
    assert layer_of(module) < layer_of("mulan.export") < layer_of("mulan.lightning.checkpoint_io")


if __name__ == "__main__":
    full = build_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE)
    print("modules:", summary(full))
    print("top level (subpackages merged):", summary(collapsed(full)))
