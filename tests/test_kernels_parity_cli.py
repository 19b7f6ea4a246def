"""`python -m kernels.parity` without the shared fixtures: a usage error that says what they are."""
from __future__ import annotations

from pathlib import Path

import pytest

from kernels.parity.__main__ import main
from kernels.parity.reference import ENV, REPO, reference_dir


def test_missing_fixtures_are_a_usage_error_naming_the_remedy(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-dir", str(tmp_path / "nope"), "--cases", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'} does not exist" in err and ENV in err and "not in this repository" in err


def test_default_location_is_beside_the_checkout(monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert reference_dir() == REPO.parent / "shared" / "reference"
    monkeypatch.setenv(ENV, "/elsewhere")
    assert reference_dir() == Path("/elsewhere")
