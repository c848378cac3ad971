"""The Mermaid diagrams of the machines render in a real browser with Mermaid itself."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safereset.diagrams import mermaid
from safereset.machines import MACHINES

RENDER = """async ([id, text]) => {
    mermaid.initialize({startOnLoad: false});
    try {
        const result = await mermaid.render(id, text);
        return {svg: result.svg, error: null};
    } catch (error) {
        return {svg: null, error: String(error.message || error)};
    }
}"""


@pytest.fixture(scope="module")
def page(chromium: Any, mermaid_js: Path) -> Iterator[Any]:
    """A blank page with Mermaid loaded, shared by the tests of this module."""
    blank = chromium.new_page()
    blank.set_content("<!doctype html><html><body></body></html>")
    blank.add_script_tag(path=str(mermaid_js))
    yield blank
    blank.close()


def render(page: Any, text: str) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(RENDER, [f"diagram{next(_ids)}", text])
    return result


_ids = itertools.count()


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_machine_diagram_renders(page: Any, name: str) -> None:
    machine = MACHINES[name]

    result = render(page, mermaid(machine))

    assert result["error"] is None, f"Mermaid rejected the {name} diagram: {result['error']}"
    for state in machine.state_names():
        assert state in result["svg"], f"state {state} is missing from the {name} diagram"


def test_invalid_diagram_is_rejected(page: Any) -> None:
    """The check above can fail: Mermaid reports a broken diagram."""
    result = render(page, "stateDiagram-v2\n    new --> : issue\n")

    assert result["error"] is not None
