"""The repository layout keeps `platform` the standard library and dependencies one-way."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
IMPORTS_OF_UPPER_LAYERS = re.compile(r"^\s*(?:import|from)\s+(tune|serve)(?:\.|\s|$)", re.MULTILINE)


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


@pytest.mark.parametrize("name", ["pipelines", "tune", "serve"])
def test_top_level_packages_import(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve() == REPO / name / "__init__.py"


def test_pipelines_imports_neither_tune_nor_serve() -> None:
    sources = sorted((REPO / "pipelines").rglob("*.py"))
    assert sources
    offenders = [
        f"{path.relative_to(REPO)}: {match.group(0).strip()}"
        for path in sources
        for match in IMPORTS_OF_UPPER_LAYERS.finditer(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_the_import_scan_would_catch_an_offender() -> None:
    assert IMPORTS_OF_UPPER_LAYERS.search("from tune.tune_imdb import x")
    assert IMPORTS_OF_UPPER_LAYERS.search("    import serve")
    assert IMPORTS_OF_UPPER_LAYERS.search("from serve import app")
    assert not IMPORTS_OF_UPPER_LAYERS.search("import tuner")
    assert not IMPORTS_OF_UPPER_LAYERS.search("from pipelines import serve_utils")


def test_importing_the_data_entry_point_loads_neither_tune_nor_serve() -> None:
    code = (
        "import sys, pipelines.prepare_imdb, pipelines.prepare, pipelines.datasets; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tune', 'serve')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
