"""Start and stop a `python -m server` subprocess on a free loopback port for one bench run.

    with spawn_server(max_batch=1) as srv:      # tiny random model, batching off
        run_against(srv.url, srv.token)

The server's log goes to a file (printed on failure); /health is polled until it answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SpawnedServer:
    url: str
    token: str
    pid: int
    log_path: Path
    max_batch: int | None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out; the tiny race until the server binds it is retried below."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(
    port: int,
    data_dir: Path,
    token: str,
    model_dir: Path | None = None,
    max_batch: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--token",
        token,
    ]
    if model_dir is not None:
        cmd += ["--model-dir", str(model_dir)]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    return cmd + list(extra)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before /health answered")
        try:
            if requests.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} not healthy after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM (graceful drain), then SIGKILL if it overstays."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextmanager
def spawn_server(
    model_dir: Path | None = None,
    max_batch: int | None = None,
    token: str = "bench-token",
    extra: Sequence[str] = (),
    startup_timeout_s: float = 600.0,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
    attempts: int = 3,
) -> Iterator[SpawnedServer]:
    """A server for the duration of the block. Without `model_dir` it builds the tiny random model in
    its own data dir (a second or so). `startup_timeout_s` covers loading a full-size checkpoint."""
    own_dir = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="cosy-bench-")) if own_dir else data_dir
    assert root is not None
    log_path = root / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(attempts):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = server_command(port, root / "data", token, model_dir, max_batch, extra)
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                    start_new_session=True,
                )
            try:
                wait_healthy(url, proc, startup_timeout_s)
                break
            except (RuntimeError, TimeoutError) as exc:
                stop(proc)
                if attempt + 1 == attempts or isinstance(exc, TimeoutError) or not _port_clash(log_path):
                    raise RuntimeError(
                        f"{exc}; command: {' '.join(cmd)}\n--- server log ---\n{_tail(log_path)}"
                    ) from exc
        assert proc is not None
        yield SpawnedServer(url=url, token=token, pid=proc.pid, log_path=log_path, max_batch=max_batch)
    finally:
        if proc is not None:
            stop(proc)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _port_clash(log_path: Path) -> bool:
    return "address already in use" in _tail(log_path).lower()


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
