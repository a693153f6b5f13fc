"""The package's layout (issue 14): imports run one way, from the command line down to the
core, as the README's map draws them, and no two modules import each other, even for types
only. Read from the source (every import statement, at any depth, under TYPE_CHECKING too),
so a lazy import inside a function counts as much as one at the top.

The layers, highest first; a module imports only from its own layer or a lower one, and
`stats` from nothing else of the package:

    tools      cli, __main__, analyze/, bench/, demo/, mock/, difflog_cli, reference
    runtime    runtime/
    admin      admin/
    release    release/
    control    control, safety
    proxy      server, connection, exchange, plan
    analysis   analysis/
    features   experiments (unit, targeting, exposure and feedback records, outcomes),
               shadow (shadow, diff, difflog), chaos (chaos, faults)
    transport  upstream, http11
    base       config, config_document, telemetry/, logfiles, logretention, jsonpointer,
               stats/
    core       core, _core_py, _faces

KNOWN lists the imports that break the rule today, each to be removed by the redesign's
next steps (the transport and the features must stop reading the Plan; the proxy's three
modules must stop importing each other; the admin token file must move below the admin).
The test fails on any other break, and on an entry of KNOWN that no longer exists, so the
list can only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import modelgate

PACKAGE = Path(modelgate.__file__).parent

LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("core", "_core_py", "_faces"),
    "base": (
        "config",
        "config_document",
        "telemetry",
        "logfiles",
        "logretention",
        "jsonpointer",
        "stats",
    ),
    "transport": ("upstream", "http11"),
    "features": (
        "unit",
        "targeting",
        "exposure",
        "feedbacklog",
        "recordfiles",
        "recordlog",
        "outcomes",
        "request_ids",
        "feedback_checks",
        "feedback_tokens",
        "shadow",
        "diff",
        "difflog",
        "chaos",
        "faults",
    ),
    "analysis": ("analysis",),
    "proxy": ("server", "connection", "exchange", "plan"),
    "control": ("control", "safety"),
    "release": ("release",),
    "admin": ("admin",),
    "runtime": ("runtime",),
    "tools": (
        "cli",
        "__main__",
        "__init__",
        "analyze",
        "bench",
        "demo",
        "mock",
        "difflog_cli",
        "reference",
    ),
}
RANK = {name: rank for rank, layer in enumerate(LAYERS.values()) for name in layer}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}

# Imports that break the rule today: (importer, imported), dotted below `modelgate.`.
KNOWN = {
    ("upstream", "plan"),  # the transport reads the Plan's upstream settings
    ("shadow", "plan"),  # the tee reads the Plan's shadow settings
    ("outcomes", "plan"),  # the record writers read the Plan's experiment designs
    ("connection", "exchange"),  # the proxy's three modules import one another
    ("connection", "server"),
    ("exchange", "connection"),
    # a fleet canary reads the gateways' admin token: the token file belongs below both
    ("release.remote", "admin.token"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports() -> dict[str, set[str]]:
    """Module (dotted below modelgate.) -> the package's modules it imports."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
                elif node.module and node.module.startswith("modelgate."):
                    module = node.module.removeprefix("modelgate.")
                elif node.module == "modelgate":
                    module = ""
                else:
                    continue
                for alias in node.names:  # `from modelgate.x import y`: y may be a module
                    full = f"{module}.{alias.name}".strip(".")
                    targets.add(full if full in modules else module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("modelgate."):
                        targets.add(alias.name.removeprefix("modelgate."))
        found[name] = {t for t in targets if t and t != name and t in modules}
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def test_every_module_has_a_layer() -> None:
    unplaced = sorted({_top(m) for m in _imports()} - set(LAYER_OF))
    assert unplaced == [], f"modules with no layer in LAYERS: {unplaced}"


def _breaks(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The imports that go up a layer, and any import of stats beyond itself."""
    broken = set()
    for importer, targets in graph.items():
        for target in targets:
            a, b = _top(importer), _top(target)
            if a != b and (a == "stats" or RANK[b] > RANK[a]):
                broken.add((importer, target))
    return broken


def test_imports_run_one_way() -> None:
    unexpected = sorted(_breaks(_imports()) - KNOWN)
    assert unexpected == [], "\n".join(
        f"{a} ({LAYER_OF[_top(a)]}) imports {b} ({LAYER_OF[_top(b)]})" for a, b in unexpected
    )


def test_stats_imports_nothing_of_the_package() -> None:
    graph = _imports()
    outside = sorted(
        (m, t) for m, ts in graph.items() if _top(m) == "stats" for t in ts if _top(t) != "stats"
    )
    assert outside == []


def test_no_two_modules_import_each_other() -> None:
    """No circles, type-only imports included: a depth-first search for a back edge."""
    edges = {m: {t for t in ts if (m, t) not in KNOWN} for m, ts in _imports().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_known_breaks_still_exist() -> None:
    """KNOWN only shrinks: an entry that the code no longer has must leave the list."""
    graph = _imports()
    stale = sorted(pair for pair in KNOWN if pair[1] not in graph.get(pair[0], set()))
    assert stale == []
