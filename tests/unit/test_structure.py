"""The package structure holds: one import package (fidel_tts) over the three folders, no import cycles between
modules or between sub-packages, no Prefect or MLflow in trainer/, export and generate apart from the training loop.
Imports are read with ast, module level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = "fidel_tts"
PACKAGES = ("trainer", "tasks", "flows")  # folders of the repo, installed as fidel_tts.<folder>


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join((TOP, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return found


def imported_names(path: Path) -> list[str]:
    """Every module an import statement in the file names, `from a.b import c` as both a.b and a.b.c."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in known.items():
        targets = {owner(name) for name in imported_names(path) if name.split(".")[0] == TOP}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_detection_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_trainer_imports_no_prefect_or_mlflow():
    offenders = sorted(f"{module}: {name}" for module, path in modules().items() if module.startswith(f"{TOP}.trainer")
                       for name in imported_names(path) if name.split(".")[0] in ("prefect", "mlflow"))
    assert offenders == []


def test_export_and_generate_do_not_import_the_training_loop():
    graph = import_graph()
    graph = {module.removeprefix(f"{TOP}."): {t.removeprefix(f"{TOP}.") for t in targets}
             for module, targets in graph.items()}
    assert "trainer.training.trainer" in graph
    for module in ("trainer.checkpoints.export", "trainer.evaluation.generate"):
        assert "trainer.training.trainer" not in graph[module], module


def subpackage(module: str) -> str:
    """fidel_tts.trainer.data.prepare -> fidel_tts.trainer.data; a module straight under a folder is its own."""
    parts = module.split(".")
    return ".".join(parts[:3]) if len(parts) > 3 or ROOT.joinpath(*parts[1:3]).is_dir() else module


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    folded: dict[str, set[str]] = {}
    for module, targets in graph.items():
        here = subpackage(module)
        folded.setdefault(here, set()).update(subpackage(t) for t in targets if subpackage(t) != here)
    for targets in list(folded.values()):
        for t in targets:
            folded.setdefault(t, set())
    return folded


def test_no_two_subpackages_import_each_other():
    assert cycles(subpackage_graph(import_graph())) == []


def test_a_planted_two_way_import_between_subpackages_is_seen():
    graph = {"fidel_tts.trainer.model.gpt": {"fidel_tts.trainer.training.options"},
             "fidel_tts.trainer.training.options": set(), "fidel_tts.trainer.training.build": {"fidel_tts.trainer.model.vocab"},
             "fidel_tts.trainer.model.vocab": set()}
    assert cycles(subpackage_graph(graph)) == [["fidel_tts.trainer.model", "fidel_tts.trainer.training"]]


def test_nothing_imports_the_folders_as_top_level_packages():
    """trainer/tasks/flows/fixtures are importable from the repo root by accident only: the installed names are
    fidel_tts.* (and tests.fixtures for the test helpers)."""
    offenders = []
    for path in sorted(ROOT.glob("**/*.py")):
        if any(part in (".venv", "build", "demo", "runs") for part in path.relative_to(ROOT).parts):
            continue
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name in imported_names(path)
                      if name.split(".")[0] in (*PACKAGES, "fixtures")]
    assert offenders == []


def test_the_wheel_lists_every_folder_with_an_init():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join((TOP, *init.parent.relative_to(ROOT).parts)) for package in PACKAGES
               for init in (ROOT / package).rglob("__init__.py")}
    assert listed == folders
