"""The start-up line with an engine that cannot describe itself (fakes, other engines)."""
from __future__ import annotations

from pathlib import Path

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
