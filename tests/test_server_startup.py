"""The start-up line with an engine that cannot describe itself (fakes, other engines)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from server.config import ServerConfig
from server.wiring import create_app, startup_line
from tests.fakes import FakeEngine, FakeExtractor


def test_startup_line_with_a_plain_engine(tmp_path: Path) -> None:
    app = create_app(ServerConfig(host="::1", port=0, data_dir=tmp_path, tokens=("t",)), engine=FakeEngine(),
                     extract_prompt=FakeExtractor())
    try:
        line = startup_line(app, 8123)
        assert line.startswith("http://[::1]:8123 · FakeEngine, max inflight 256")
        assert "model TINY RANDOM (noise)" in line and "store local" in line
    finally:
        app.store.close()
        assert app.pool is not None
        app.pool.shutdown()


def test_the_engine_roles_without_the_engine_extra_exit_saying_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SystemExit, match=r"--role all runs the engine, which needs torch(, [a-z]+)*: .*'\.\[engine\]'"):
        create_app(ServerConfig(host="::1", port=0, data_dir=tmp_path, tokens=("t",)))
    assert not (tmp_path / "tiny-model").exists()  # it stopped before building anything
