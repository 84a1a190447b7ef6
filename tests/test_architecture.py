"""docs/ARCHITECTURE.md against the code, so the page cannot fall behind the package.

Two tables of the page are read: ``## Modules`` must name every module of ``hnseg_keras`` (found at
run time, so a new module fails here until the page describes it) and no module that is gone; ``## Import
directions`` must equal the table ``tests/test_layering.py`` enforces (``BASE`` and ``ALLOWED``).
"""

from __future__ import annotations

import re

import pytest
from test_layering import ALLOWED, BASE, PACKAGE

DOC = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
EVERY_MODULE = "(every module)"  # the import table's row for BASE


def table_rows(text: str, heading: str) -> list[list[str]]:
    """Cells of the first markdown table under ``heading`` (a whole line), header and rule rows left out."""
    lines = text.splitlines()
    if heading not in lines:
        raise AssertionError(f"{DOC.name}: no {heading!r} section")
    rows = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def code_names(cell: str) -> list[str]:
    """The `backticked` names of a table cell."""
    return re.findall(r"`([^`]+)`", cell)


def package_modules() -> set[str]:
    """Module files of the package as paths under ``hnseg_keras/`` (``__init__.py`` only marks a package)."""
    return {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}


def documented_modules(text: str) -> set[str]:
    return {name for row in table_rows(text, "## Modules") for name in code_names(row[0])}


def documented_imports(text: str) -> dict[str, set[str]]:
    return {code_names(row[0])[0] if code_names(row[0]) else row[0]: set(code_names(row[1]))
            for row in table_rows(text, "## Import directions")}


def import_table() -> str:
    """The ``## Import directions`` table as the page should carry it (printed when they differ)."""
    rows = [(EVERY_MODULE, BASE), *ALLOWED.items()]
    lines = ["| module (prefix) | may import |", "|---|---|"]
    for prefix, allowed in rows:
        key = prefix if prefix == EVERY_MODULE else f"`{prefix}`"
        lines.append(f"| {key} | {', '.join(f'`{name}`' for name in allowed) or 'nothing else'} |")
    return "\n".join(lines)


def test_every_module_is_named_in_the_architecture_page():
    documented, actual = documented_modules(DOC.read_text()), package_modules()
    missing, gone = sorted(actual - documented), sorted(documented - actual)
    assert not missing, f"add a row to the ## Modules table of {DOC.name} for each of {missing}"
    assert not gone, f"{DOC.name} names modules the package no longer has: {gone}"


def test_the_import_table_is_the_one_the_layering_test_enforces():
    expected = {EVERY_MODULE: set(BASE), **{prefix: set(allowed) for prefix, allowed in ALLOWED.items()}}
    assert documented_imports(DOC.read_text()) == expected, f"{DOC.name} should carry:\n{import_table()}"


@pytest.mark.parametrize("page, missing", [
    ("## Modules\n\n| module | role |\n|---|---|\n| `cli.py` | the command |\n\n## Next\n| `x.py` | no |\n",
     "api.py"),
    ("## Modules\nprose\n| module | role |\n|---|---|\n| `cli.py`, `api.py` | both |\n", "configs.py"),
])
def test_the_module_table_is_read_as_written(page, missing):
    assert documented_modules(page) >= {"cli.py"} and "x.py" not in documented_modules(page)
    assert missing not in documented_modules(page) and missing in package_modules()


def test_a_page_without_the_section_fails():
    with pytest.raises(AssertionError, match="no '## Modules' section"):
        documented_modules("# Architecture\n")
