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
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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
    token: str | None,
    model_dir: Path | None = None,
    max_batch: int | None = None,
    extra: Sequence[str] = (),
    module: str = "server",
) -> list[str]:
    """`python -m <module>` (the server, or bench.null_server: the same flags) on loopback."""
    cmd = [
        sys.executable,
        "-m",
        module,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    if token is not None:  # a backend has no public token
        cmd += ["--token", token]
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
    module: str = "server",
) -> Iterator[SpawnedServer]:
    """A server for the duration of the block. Without `model_dir` it builds the tiny random model in
    its own data dir (a second or so). `startup_timeout_s` covers loading a full-size checkpoint.
    `module="bench.null_server"`: the same server with a null engine (needs `model_dir`)."""
    with _scratch(data_dir) as root, ExitStack() as procs:
        log_path = root / "server.log"
        url, proc = procs.enter_context(
            _launched(
                lambda port: server_command(port, root / "data", token, model_dir, max_batch, extra, module),
                log_path, env, startup_timeout_s, attempts,
            )
        )  # fmt: skip
        yield SpawnedServer(url=url, token=token, pid=proc.pid, log_path=log_path, max_batch=max_batch)


@contextmanager
def spawn_split(
    backends: int,
    model_dir: Path | None = None,
    max_batch: int | None = None,
    token: str = "bench-token",
    extra: Sequence[str] = (),
    startup_timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
    module: str = "server",
) -> Iterator[SpawnedServer]:
    """`--role frontend` over `backends` x `--role backend`, all on loopback, for the block; the
    SpawnedServer is the frontend (its log; the backends log beside it). `extra` goes to the backends
    (engine flags); without `model_dir` the tiny random model is built once and shared (the frontend
    reads its tokenizer files). `module` runs the backends (bench.null_server: null engines)."""
    with _scratch(None) as root, ExitStack() as procs:
        if model_dir is None:
            model_dir = build_tiny_model(root / "model")
        internal = ["--internal-token", f"{token}-internal"]
        urls = []
        for k in range(backends):
            url, _ = procs.enter_context(
                _launched(
                    lambda port, k=k: server_command(port, root / f"backend-{k}", None, model_dir, max_batch,
                                                     ["--role", "backend", *internal, *extra], module),
                    root / f"backend-{k}.log", env, startup_timeout_s,
                )
            )  # fmt: skip
            urls.append(url)
        log_path = root / "frontend.log"
        routing = [arg for url in urls for arg in ("--backend", url)]
        url, proc = procs.enter_context(
            _launched(
                lambda port: server_command(port, root / "frontend", token, model_dir, None,
                                            ["--role", "frontend", *internal, *routing]),
                log_path, env, startup_timeout_s,
            )
        )  # fmt: skip
        yield SpawnedServer(url=url, token=token, pid=proc.pid, log_path=log_path, max_batch=max_batch)


def build_tiny_model(out: Path) -> Path:
    """The tiny random checkpoint (the one a server builds for itself without --model-dir) into `out`,
    so several spawned servers can share one."""
    subprocess.run(
        [sys.executable, "-m", "kernels.weights.make_checkpoint", "--preset", "tiny", "--out", str(out)],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    return out


@contextmanager
def _scratch(data_dir: Path | None) -> Iterator[Path]:
    """`data_dir` as it is, or a temporary directory removed afterwards."""
    if data_dir is not None:
        yield data_dir
        return
    root = Path(tempfile.mkdtemp(prefix="cosy-bench-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _launched(
    command: Callable[[int], list[str]],
    log_path: Path,
    env: dict[str, str] | None,
    startup_timeout_s: float,
    attempts: int = 3,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start `command(port)` on a free port until /health answers (a port taken in the meantime is
    retried on another), yield (url, process), stop it afterwards."""
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(attempts):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = command(port)
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
        yield url, proc
    finally:
        if proc is not None:
            stop(proc)


def _port_clash(log_path: Path) -> bool:
    return "address already in use" in _tail(log_path).lower()


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
