"""The dependency rule, checked on the source: every module under ``appliance/`` and ``drivers/``
is parsed with :mod:`ast` (nothing is imported) and its imports are checked.

(a) ``drivers/`` never imports ``appliance/``.
(b) The pipeline stages import each other only through ``appliance.contracts``: a module of a
    stage package may import its own stage, :data:`SHARED` and nothing else of ``appliance``
    (anywhere in the file: module level, inside functions, under ``TYPE_CHECKING``). The wiring
    (``runtime/``, ``downlink/``, ``cli``, ``demo/``, ``simulate/``) may import anything.
(c) No import cycle among the modules of ``appliance/`` and ``drivers/``, counting every import
    (a cycle hidden behind an import inside a function or under ``TYPE_CHECKING`` still ties
    the modules together: neither can be read, tested or replaced without the other).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("appliance", "drivers")

STAGES = frozenset(
    {"acquire", "features", "batch", "infer", "alerts", "downsample", "outbox", "uplink"}
)
"""The stage packages under ``appliance/`` (the data flow of docs/architecture.md)."""

SHARED = frozenset(
    {
        "appliance",  # the package itself (its __init__ defines nothing a stage needs)
        "appliance.contracts",  # the interfaces and the data passed between stages
        "appliance.payload",  # the stored message format (re-exported by contracts)
        "appliance.config",  # each stage's typed config section
        "appliance.errors",  # the error taxonomy
        "appliance.backoff",  # capped exponential backoff with full jitter (acquire, uplink)
    }
)
"""Modules of ``appliance`` that every stage may import."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, wherever it is."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of ``appliance``/``drivers`` that ``node`` (in ``module``) imports: for
    ``from pkg import name``, ``pkg.name`` when that is a module, else ``pkg``."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            is_package = MODULES[module].name == "__init__.py"
            parent = module.split(".")[: len(module.split(".")) - node.level + is_package]
            base = ".".join(parent + ([base] if base else []))
        names = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.append(sub if sub in MODULES else base)
    out = []
    for name in names:
        if name.split(".")[0] not in PACKAGES:
            continue
        while name not in MODULES and "." in name:  # `import a.b.c` of a name, not a module
            name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of ``appliance``/``drivers`` it imports."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        deps = graph.setdefault(module, set())
        for node in _imports(tree):
            deps.update(t for t in _targets(module, node) if t != module)
    return graph


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "appliance" and parts[1] in STAGES:
        return parts[1]
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_graph_sees_every_module_and_known_imports() -> None:
    graph = _graph()
    assert {"appliance.contracts", "appliance.runtime.supervisor", "drivers.modbus.tcp"} <= set(
        graph
    )
    assert "appliance.contracts" in graph["appliance.features.windows"]
    assert "drivers.modbus.tcp" in graph["appliance.acquire.driver"]


def test_cycle_finder_finds_a_cycle_and_only_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_drivers_never_import_appliance() -> None:
    graph = _graph()
    bad = sorted(
        f"{m} imports {t}"
        for m, deps in graph.items()
        if m.startswith("drivers")
        for t in deps
        if t.startswith("appliance")
    )
    assert bad == []


def test_stages_import_each_other_only_through_contracts() -> None:
    graph = _graph()
    bad = sorted(
        f"{m} imports {t}"
        for m, deps in graph.items()
        if (stage := _stage(m)) is not None
        for t in deps
        if t.startswith("appliance") and _stage(t) != stage and t not in SHARED
    )
    assert bad == []


def test_shared_modules_import_no_stage() -> None:
    graph = _graph()
    bad = sorted(
        f"{m} imports {t}" for m in SHARED for t in graph.get(m, ()) if _stage(t) is not None
    )
    assert bad == []


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_only_the_wiring_imports_the_downlink() -> None:
    """The downlink owns the pipeline (its runner builds and restarts the ``Appliance``), so
    the pipeline never imports it: only the CLI does (and the downlink itself)."""
    offenders = sorted(
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        for dep in deps
        if dep.startswith("appliance.downlink")
        and not module.startswith("appliance.downlink")
        and module != "appliance.cli"
    )
    assert offenders == []
