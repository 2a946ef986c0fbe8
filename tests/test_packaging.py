"""The built wheel installs agents/, envs/ and configs/ as minc_rl subpackages and nothing else at the top level."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("minc_rl.agents", "minc_rl.envs", "minc_rl.configs")


def package_dirs() -> dict[str, str]:
    """The pyproject's package-dir mapping: package name -> source folder."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-dir"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the source tree (no stale build/ dir) and pip-install it into a target folder."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in set(package_dirs().values()):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = wheels.glob("minc_rl-*.whl")
    target = root / "target"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return target


def test_only_minc_rl_lands_at_the_top_level(installed: Path) -> None:
    top_level = {path.name for path in installed.iterdir()}
    assert not top_level & {"agents", "envs", "configs"}, top_level
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"minc_rl"}, top_level


def test_subpackages_import_from_the_wheel(installed: Path) -> None:
    """Import in an isolated interpreter (-I: no cwd, no PYTHONPATH) with the target first on sys.path."""
    script = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(installed)!r})\n"
        f"print(json.dumps({{name: importlib.import_module(name).__file__ for name in {SUBPACKAGES!r}}}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=installed.parent, timeout=300
    )
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout.strip().splitlines()[-1])
    for name, file in files.items():
        assert Path(file).resolve().is_relative_to(installed.resolve()), f"{name} imported from {file}, not the wheel"


def test_wheel_holds_every_source_module_and_config(installed: Path) -> None:
    """Every .py and .yaml of each mapped folder is in the wheel (a new sub-folder missing from `packages` fails)."""
    for package, folder in package_dirs().items():
        source = REPO / folder
        wanted = [
            path.relative_to(source)
            for pattern in ("*.py", "*.yaml")
            for path in source.rglob(pattern)
            if "__pycache__" not in path.parts
        ]
        installed_root = installed.joinpath(*package.split("."))
        missing = [str(path) for path in wanted if not (installed_root / path).is_file()]
        assert not missing, f"{package} wheel lacks {missing}"
