"""The package's layers point down only, and a built wheel holds one top-level name.

Every import in syncpoint/ (function-level ones included) is read with `ast` and mapped to
its layer; a module may import its own layer or one below it. The simulator stands apart:
it models the external APIs and shares no code with the client side, so the client can
never lean on the simulator's assumptions.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "syncpoint"

# Bottom to top. A layer may import from itself and from every layer before it.
LAYERS = (
    "core",
    "blocks",
    "sources",
    "tasks",
    "engine",
    "settings",
    "flows",
    "cli",
)
# Layers that may import the simulator (to start the built-in API when asked for).
USES_SIMULATOR = {"settings", "cli"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "syncpoint" or len(parts) < 2:
        return None
    return parts[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "syncpoint":
                found.extend((node.lineno, f"syncpoint.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, node.module))
    return found


def module_layer(path: Path, package: Path = PACKAGE) -> str:
    return path.relative_to(package).parts[0].removesuffix(".py")


def violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        mine = module_layer(path, package)
        if mine == "__init__":
            continue
        for line, target in imports_of(path):
            theirs = layer_of(target)
            if theirs is None or theirs == mine:
                continue
            where = f"{path.relative_to(package.parent)}:{line} imports {target}"
            if mine == "simulator":
                out.append(f"{where}: the simulator imports nothing of syncpoint")
            elif theirs == "simulator":
                if mine not in USES_SIMULATOR:
                    out.append(f"{where}: only {sorted(USES_SIMULATOR)} may start the simulator")
            elif mine not in LAYERS or theirs not in LAYERS:
                out.append(f"{where}: {mine!r} or {theirs!r} is not a known layer")
            elif LAYERS.index(theirs) > LAYERS.index(mine):
                out.append(f"{where}: {mine} sits below {theirs}")
    return out


def test_layers_point_down_only() -> None:
    assert violations() == []


def test_every_package_module_belongs_to_a_layer() -> None:
    known = {*LAYERS, "simulator", "__init__"}
    strays = {module_layer(p) for p in PACKAGE.rglob("*.py")} - known
    assert strays == set()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from syncpoint.engine.job_run import JobRun\n", ["sits below engine"]),
        ("def f():\n    from syncpoint import settings\n", ["sits below settings"]),
        ("import syncpoint.simulator\n", ["may start the simulator"]),
        ("from syncpoint.core.errors import SyncError\n", []),
    ],
    ids=["engine-from-core", "function-level-import", "simulator-from-core", "allowed"],
)
def test_the_check_catches_an_upward_import(
    source: str, expected: list[str], tmp_path: Path
) -> None:
    # A throwaway core module in a package of its own proves the walker can fail.
    fake = tmp_path / "syncpoint"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "probe.py").write_text(source)
    found = violations(fake)
    assert len(found) == len(expected)
    for message, fragment in zip(found, expected, strict=True):
        assert fragment in message


def test_the_wheel_installs_one_top_level_name() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include == ["syncpoint*"]
    # The folders a Prefect user looks for are the package's own, not second copies.
    for folder in ("flows", "tasks", "blocks"):
        top = ROOT / folder
        assert top.is_symlink()
        assert top.resolve() == (PACKAGE / folder).resolve()
