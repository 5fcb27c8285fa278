"""What may import what, read from the source (no server, no import of the code under test):

    liftoff_sandbox (the demo's and the tests' servers and fakes)
        -> anything below; nothing below imports it
    liftoff.deployments -> liftoff.flows -> liftoff.tasks -> liftoff.systems -> core
    core: liftoff.{errors, redaction, logs, ledger, steps, reports, checks, phases, prefect_server},
          liftoff.runbooks

A building block (liftoff.systems) knows one system: no Prefect, no step, no flow. Steps (liftoff.tasks)
import no flow; flows import no deployment; the core imports none of the layers above it. The CLI
(liftoff.cli) is the top of the product: it may reach flows and deployments, never the sandbox (the demo
is the sandbox's command, added by the entry point ``liftoff.commands``)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

SERVERS = False  # no server, no flow: runs under `pytest -m "not servers"`

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"liftoff": "liftoff", "flows": "liftoff.flows", "tasks": "liftoff.tasks", "runbooks": "liftoff.runbooks",
           "deployments": "liftoff.deployments", "sandbox": "liftoff_sandbox"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0:1] = FOLDERS[parts[0]].split(".")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, set[str]]:
    """Every module of the distribution and the absolute imports it makes anywhere in its body."""
    found = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            imports = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imports |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imports |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            found[_module(path)] = imports
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    if module.startswith("liftoff_sandbox"):
        return "sandbox"
    for layer in ("systems", "tasks", "flows", "deployments", "runbooks"):
        if module.startswith(f"liftoff.{layer}"):
            return "core" if layer == "runbooks" else layer
    return "cli" if module == "liftoff.cli" else "core"


FORBIDDEN = {  # a layer -> the prefixes of what it must not import
    "core": ("liftoff.systems", "liftoff.tasks", "liftoff.flows", "liftoff.deployments", "liftoff.cli",
             "liftoff_sandbox"),
    "systems": ("prefect", "liftoff.tasks", "liftoff.flows", "liftoff.deployments", "liftoff.cli",
                "liftoff_sandbox"),
    "tasks": ("liftoff.flows", "liftoff.deployments", "liftoff.cli", "liftoff_sandbox"),
    "flows": ("liftoff.deployments", "liftoff.cli", "liftoff_sandbox"),
    "deployments": ("liftoff.cli", "liftoff_sandbox"),
    "cli": ("liftoff_sandbox",),
}


def _breaks(imported: str, prefixes: tuple[str, ...]) -> bool:
    return any(imported == p or imported.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_a_layer_above_it_or_the_sandbox(layer):
    broken = sorted(f"{module} imports {imported}" for module, imports in MODULES.items()
                    if _layer(module) == layer for imported in imports if _breaks(imported, FORBIDDEN[layer]))
    assert broken == []


def test_the_rules_see_every_layer():
    """A rule over no module proves nothing: each layer has modules, and the sandbox is one of them."""
    assert {_layer(m) for m in MODULES} == {*FORBIDDEN, "sandbox"}
    assert len([m for m in MODULES if _layer(m) == "systems"]) >= 15


def test_the_wheel_lists_every_package_and_maps_the_folders():
    """`pip install .` builds a wheel from this list: a package missing here is missing from the install."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {m for m, _ in MODULES.items() if (ROOT / Path(*_folder_parts(m)) / "__init__.py").exists()}
    assert set(config["packages"]) == packages
    assert {v: k for k, v in config["package-dir"].items()} == {f: n for f, n in FOLDERS.items() if f != "liftoff"}


def _folder_parts(module: str) -> list[str]:
    for folder, name in sorted(FOLDERS.items(), key=lambda kv: -len(kv[1])):
        if module == name or module.startswith(name + "."):
            return [folder, *module[len(name):].strip(".").split(".")] if module != name else [folder]
    raise AssertionError(module)


def test_steps_live_in_one_package_per_phase():
    """``tasks/`` holds phase packages only: a module at its top would be a step of no phase (or a building
    block in the wrong room)."""
    assert sorted(p.name for p in (ROOT / "tasks").glob("*.py")) == ["__init__.py"]


def test_every_step_module_of_a_phase_is_in_its_package():
    """A building block is known by importing no Prefect; a module of ``liftoff.systems`` never does (the rule
    above), and every Prefect task is defined under ``liftoff.tasks``."""
    defining = sorted(m for m, imports in MODULES.items() if "prefect.task" in imports and _layer(m) != "tasks"
                      and _layer(m) not in ("sandbox", "flows", "deployments", "cli"))
    assert defining == []


def test_test_modules_take_helpers_from_helpers_and_fixtures_from_pytest():
    """conftest.py is pytest's (fixtures and hooks); a module importing it by name gets a second copy of it
    (as ``conftest`` and ``tests.conftest``). Shared plain helpers live in tests/helpers.py."""
    importing = sorted(p.name for p in (ROOT / "tests").glob("*.py")
                       if any(isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[-1] == "conftest"
                              for n in ast.walk(ast.parse(p.read_text()))))
    assert importing == []
