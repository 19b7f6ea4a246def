"""docs/faults.md: every test a row names exists, and every bad-input case has its row."""
from __future__ import annotations

import re
from pathlib import Path

from tests.test_server_errors import CASES

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "faults.md"
REF = re.compile(r"`((?:tests/[\w/]+\.py)?)::(\w+)(?:\[([^\]]+)\])?`")


def _rows() -> list[str]:
    return [line for line in TABLE.read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| input or fault", "| ---"))]


def _refs(row: str) -> list[tuple[str, str, str | None]]:
    """(file, test, param) of each `file::test[param]` in the row's last cell; `::test` reuses the file before."""
    cell, out, file = row.rstrip(" |").rsplit("|", 1)[1], [], ""
    for path, name, param in REF.findall(cell):
        file = path or file
        out.append((file, name, param or None))
    return out


def test_every_row_names_a_test_that_exists() -> None:
    rows = _rows()
    assert len(rows) >= 80
    for row in rows:
        refs = _refs(row)
        assert refs, f"a row without a test: {row}"
        for file, name, _ in refs:
            assert file, f"`::{name}` with no file before it: {row}"
            source = (ROOT / file).read_text()
            assert re.search(rf"^(async )?def {name}\(", source, re.MULTILINE), f"{file} has no test {name}"


def test_every_bad_input_case_has_its_row() -> None:
    named = {param for row in _rows() for _, name, param in _refs(row)
             if name == "test_bad_input_is_refused_and_changes_nothing"}
    assert named == {case[0] for case in CASES}
