"""docs/threat-model.md and the tests agree: every threat is tested, every marker is real."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "threat-model.md"
ROW = re.compile(r"^\| (T\d\d) \|")


def documented() -> dict[str, set[str]]:
    """Return each threat id of the table with the test names of its tests column."""
    threats = {}
    for line in DOCUMENT.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            tests_column = line.rstrip(" |").rsplit("|", 1)[1]
            threats[match.group(1)] = set(re.findall(r"`(test_\w+)`", tests_column))
    return threats


def marked() -> dict[str, set[str]]:
    """Return each threat id named by a ``pytest.mark.threat`` marker with its tests."""
    tests: dict[str, set[str]] = defaultdict(set)
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr == "threat"
                ):
                    for argument in decorator.args:
                        assert isinstance(argument, ast.Constant), f"{path.name}:{node.name}"
                        tests[str(argument.value)].add(node.name)
    return tests


def test_table_is_not_empty() -> None:
    assert len(documented()) >= 20


def test_every_threat_has_tests() -> None:
    untested = sorted(threat for threat in documented() if not marked().get(threat))
    assert untested == [], f"threats without a marked test: {untested}"


def test_every_marker_names_a_threat() -> None:
    unknown = sorted(set(marked()) - set(documented()))
    assert unknown == [], f"markers name threats missing from docs/threat-model.md: {unknown}"


def test_tests_column_matches_markers() -> None:
    table, markers = documented(), marked()
    for threat, names in table.items():
        assert names == markers.get(threat, set()), (
            f"{threat}: the tests column lists {sorted(names)}, "
            f"the markers are on {sorted(markers.get(threat, set()))}"
        )


def test_security_doc_names_real_tests() -> None:
    """Every test that docs/security.md cites exists, so the mapping cannot rot."""
    cited = set(re.findall(r"`(test_\w+)`", (ROOT / "docs" / "security.md").read_text("utf-8")))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                defined.add(node.name)

    assert cited
    assert sorted(cited - defined) == []
