"""The repository layout: `platform` stays the standard library, the layers of pipelines/ point one
way, every module names its job, and every command the docs tell people to type names a module."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "serve", "tune")
# Higher imports lower, never the reverse; equal ranks do not import each other's package.
# docs/architecture.md draws the same picture.
LAYERS = {
    "pipelines.core": 0,
    "pipelines.text": 1,
    "pipelines.cluster": 1,
    "pipelines.data": 2,
    "pipelines.inference": 3,
    "pipelines.tracking": 4,
    "pipelines.training": 5,
    "pipelines": 6,  # the entry points: prepare_imdb, train_imdb, predict, evaluate
    "serve": 7,
    "tune": 7,
}
# Serve's replicas load a registered model: they have no business with training.
SERVE_NEVER_IMPORTS = ("pipelines.training", "tune")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def layer_of(module: str) -> str:
    """The layer a module belongs to: its subpackage of pipelines/, or its top-level package."""
    parts = module.split(".")
    if parts[0] == "pipelines" and len(parts) > 1 and (REPO / "pipelines" / parts[1]).is_dir():
        return ".".join(parts[:2])
    return parts[0]


def platform_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The platform's modules that `path` imports (anywhere in it, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: platform_imports(path, modules) - {name} for name, path in modules.items()}


def test_import_platform_is_the_standard_library() -> None:
    import platform

    assert callable(platform.system) and isinstance(platform.system(), str)
    assert callable(platform.python_version)
    assert REPO not in Path(platform.__file__).resolve().parents


def test_import_platform_from_the_repo_root_is_the_standard_library() -> None:
    # `python -c` puts the current folder first on sys.path: the worst case for shadowing
    code = "import platform, sys; platform.system(); print(platform.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    location = Path(proc.stdout.strip()).resolve()
    assert REPO not in location.parents, location


def test_no_platform_module_at_the_root() -> None:
    assert not (REPO / "platform" / "__init__.py").exists()
    assert not (REPO / "platform.py").exists()
    assert not (REPO / "platform").is_file()


@pytest.mark.parametrize("name", PACKAGES)
def test_top_level_packages_import(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve() == REPO / name / "__init__.py"


def test_every_module_is_in_a_layer(graph) -> None:
    assert len(graph) > 60
    assert {layer_of(name) for name in graph} <= set(LAYERS)


def test_imports_point_down_the_layers(graph) -> None:
    upward = [
        f"{source} ({layer_of(source)}) imports {target} ({layer_of(target)})"
        for source, targets in graph.items()
        for target in targets
        if layer_of(source) != layer_of(target) and LAYERS[layer_of(target)] >= LAYERS[layer_of(source)]
    ]
    assert upward == []


def test_no_import_cycle(graph) -> None:
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_layer_checks_would_catch_an_offender(graph) -> None:
    modules = module_files()
    fake = dict(graph)
    fake["pipelines.core.storage"] = graph["pipelines.core.storage"] | {"pipelines.tracking.runs"}
    assert any(
        LAYERS[layer_of(t)] >= LAYERS[layer_of(s)] and layer_of(s) != layer_of(t) for s, ts in fake.items() for t in ts
    )
    source = REPO / "tests" / "layer_probe.py"
    try:
        source.write_text("def f():\n    from pipelines.training.job import run_training\n")
        assert platform_imports(source, modules) == {"pipelines.training.job"}
    finally:
        source.unlink()


def test_serve_never_imports_training_or_tune(graph) -> None:
    offenders = [
        f"{source} imports {target}"
        for source, targets in graph.items()
        if source.startswith("serve")
        for target in targets
        if target.startswith(SERVE_NEVER_IMPORTS)
    ]
    assert offenders == []


def test_a_serve_replica_loads_neither_ray_train_nor_ray_tune() -> None:
    # serve.app holds both deployments: what a replica's worker imports to run them
    code = (
        "import sys, serve.app; "
        "print(sorted({m.split('.')[0] + '.' + m.split('.')[1] for m in sys.modules "
        "if m.startswith(('ray.train', 'ray.tune', 'pipelines.training', 'tune.'))}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_importing_the_data_entry_point_loads_neither_tune_nor_serve() -> None:
    code = (
        "import sys, pipelines.prepare_imdb, pipelines.data.prepare, pipelines.data.datasets; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tune', 'serve')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_module_names_its_job_in_a_docstring() -> None:
    missing = [
        str(path.relative_to(REPO))
        for name, path in module_files().items()
        if not (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()
    ]
    assert missing == []


# --- commands in the docs name modules that exist ----------------------------------------

DOC_FILES = ["README.md", "Makefile", "cluster.yaml", "serve/config.yaml", ".ci/run"]
DOC_GLOBS = ["docs/*.md", "platform/**/*.md", "platform/**/*.yaml", "platform/**/*.yml", "platform/**/Dockerfile*", "platform/**/*.sh"]
PYTHON_M = re.compile(r"python3?\s+-m\s+([A-Za-z_][\w.]*)")
IMPORT_PATH = re.compile(r"import_path:\s*([A-Za-z_][\w.]*):")


def documented_targets() -> dict[str, list[str]]:
    files = [REPO / name for name in DOC_FILES if (REPO / name).exists()]
    for pattern in DOC_GLOBS:
        files += sorted(REPO.glob(pattern))
    targets: dict[str, list[str]] = {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        for match in list(PYTHON_M.finditer(text)) + list(IMPORT_PATH.finditer(text)):
            targets.setdefault(match.group(1).rstrip("."), []).append(str(path.relative_to(REPO)))
    return targets


def test_the_docs_name_the_entry_points() -> None:
    targets = documented_targets()
    for entry in ("pipelines.prepare_imdb", "pipelines.train_imdb", "tune.tune_imdb", "serve.app"):
        assert entry in targets, entry


def test_every_module_the_docs_tell_people_to_run_exists() -> None:
    missing = {}
    for target, where in documented_targets().items():
        if target.split(".")[0] not in PACKAGES:
            continue  # pytest, mlflow, moto.server: other people's modules
        try:
            spec = importlib.util.find_spec(target)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            missing[target] = where
    assert missing == {}
