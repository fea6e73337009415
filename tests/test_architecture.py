"""The package tree reads as the data flow: no import cycle between modules, nothing imports the CLI, the package
root holds only the public entry points, and imports sit at module top unless a heavy optional dependency is
deferred on purpose. The folder layering itself is `lint-imports` (pyproject.toml), run by CI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_stage_attribution"
ROOT_MODULES = {"__init__.py", "__main__.py", "_version.py", "errors.py", "attributor.py"}
# Third-party packages that are imported inside functions on purpose: importing them costs seconds and memory, and
# most commands never need them (``import hf_stage_attribution`` imports none of them).
DEFERRED = {
    "accelerate",
    "datasets",
    "evaluate",
    "huggingface_hub",
    "matplotlib",
    "peft",
    "profanity_check",
    "better_profanity",
    "sklearn",
    "tokenizers",
    "transformers",
    "trl",
}

# Our own modules that exist to subclass a heavy dependency's class (transformers.TrainerCallback, PreTrainedModel) or
# to train with it (the example pipelines): deferred like it.
DEFERRED_OWN = {
    "hf_stage_attribution.model_card.callback",
    "hf_stage_attribution.cli.step_progress",
    "hf_stage_attribution.examples.spurious_digits_model",
    "hf_stage_attribution.examples.spurious_digits",
    "hf_stage_attribution.examples.lm_pipeline",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[ast.AST]:
    skip: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(ast.walk(node))
    return skip


def _imports(path: Path) -> list[tuple[ast.AST, str, bool]]:
    """(node, absolute target, at module top) for every runtime import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if node in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            targets = [a.name for a in node.names]
        for target in targets:
            out.append((node, target, node.col_offset == 0))
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for _, target, _top in _imports(path):
            if target in files and target != module:
                graph[module].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    """Every runtime import counts, in-function ones too (a deferred import only hides a cycle)."""
    graph = _graph()
    # A package __init__ that re-exports its modules forms a trivial loop with a module importing a sibling through
    # the package name; count only module → module edges for those.
    for module in graph:
        graph[module] = {t for t in graph[module] if not (module.startswith(t + "."))}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_outside_cli_imports_cli():
    # ``python -m hf_stage_attribution`` (``__main__``) is the command itself: the one module above the CLI.
    offenders = [
        f"{_module_name(p)} imports {target}"
        for p in PACKAGE.rglob("*.py")
        if not _module_name(p).startswith(("hf_stage_attribution.cli", "hf_stage_attribution.__main__"))
        for _, target, _top in _imports(p)
        if target == "hf_stage_attribution.cli" or target.startswith("hf_stage_attribution.cli.")
    ]
    assert offenders == []


def test_package_root_holds_only_entry_points():
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES


def test_imports_at_module_top_unless_a_heavy_dependency_is_deferred():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_blocks = [n for n in tree.body if isinstance(n, (ast.Try, ast.If))]  # `try: import x` at module level
        for node, target, top in _imports(path):
            if top or any(b.lineno <= node.lineno <= b.end_lineno for b in top_blocks):
                continue
            if (
                target.split(".")[0] in DEFERRED | {"fcntl", "importlib"}
                or target in DEFERRED_OWN
                or target.rsplit(".", 1)[0] in DEFERRED_OWN
            ):
                continue
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {target}")
    assert offenders == [], "imports inside functions:\n" + "\n".join(sorted(set(offenders)))


def test_layer_contracts_hold():
    """`lint-imports` with the contracts in pyproject.toml (layers, the ledger facade, acyclic siblings)."""
    exe = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(exe), "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
