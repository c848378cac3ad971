"""Generated docs match the code, and the machines stay free of I/O and clocks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from safereset.diagrams import document, mermaid
from safereset.machines import MACHINES

ROOT = Path(__file__).resolve().parent.parent
MACHINES_DIR = ROOT / "src" / "safereset" / "machines"

# Packages that do I/O or belong to other layers.
FORBIDDEN_IMPORTS = (
    "safereset.store",
    "safereset.mail",
    "safereset.web",
    "safereset.service",
    "safereset.runtime",
    "sqlalchemy",
    "fastapi",
    "starlette",
    "aiosmtplib",
    "socket",
    "os",
    "time",
    "random",
    "secrets",
)
# Calls that read a clock or draw randomness.
FORBIDDEN_CALLS = ("now", "utcnow", "today", "time", "monotonic", "perf_counter", "random")


def test_machines_doc_is_current() -> None:
    committed = (ROOT / "docs" / "machines.md").read_text(encoding="utf-8")
    assert committed == document(), (
        "docs/machines.md is stale: run `safereset diagram --format markdown-doc "
        "> docs/machines.md`"
    )


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_mermaid_shape(name: str) -> None:
    lines = mermaid(MACHINES[name]).splitlines()
    assert lines[0] == "stateDiagram-v2"
    assert lines[1] == "    [*] --> new"
    assert len(lines) == 2 + len(MACHINES[name].transitions())


def _imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
    return found


@pytest.mark.parametrize("path", sorted(MACHINES_DIR.glob("*.py")), ids=lambda path: path.name)
def test_machine_module_does_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for module in _imports(tree):
        for forbidden in FORBIDDEN_IMPORTS:
            top_level = module.split(".")[: forbidden.count(".") + 1]
            assert ".".join(top_level) != forbidden, (
                f"{path.name} imports {module}; machines must not do I/O or reach other layers"
            )
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in FORBIDDEN_CALLS, (
                f"{path.name}:{node.lineno} calls .{node.func.attr}(); time must be an input"
            )
        if isinstance(node, ast.Name):
            assert node.id != "open", f"{path.name}:{node.lineno} uses open()"
