"""`python -m tests.fake_server [--fsize-limit=BYTES] <the server's flags>`: the real server process
(`server.serving.run`: config, store, uvloop, signals) with the fake engine and prompt extractor, for tests
that kill it, restart it, or starve it of disk. It logs "ready on http://HOST:PORT" as `python -m server`.

`--fsize-limit` (first, if given): RLIMIT_FSIZE for the process with SIGXFSZ ignored, so a write past the
limit fails with EFBIG, as a full disk fails with ENOSPC (no mount or root needed).
"""
from __future__ import annotations

import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from server.config import load_config
from server.serving import run
from server.wiring import create_app
from tests.fakes import FakeEngine, FakeExtractor


def main(argv: list[str]) -> None:
    if argv and argv[0].startswith("--fsize-limit="):
        limit = int(argv.pop(0).split("=", 1)[1])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(argv)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    run(create_app(config, engine=FakeEngine(), extract_prompt=FakeExtractor()))


@dataclass
class ServingProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """kill -9: no drain, no close; what the store had half-done stays as it was."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@contextmanager
def serving_process(data_dir: Path, *flags: str, fsize_limit: int | None = None,
                    env: dict[str, str] | None = None) -> Iterator[ServingProcess]:
    """The fake server on a free port, storing under `data_dir` (its log beside it); stopped on exit
    (SIGTERM, the drain) unless the test killed it."""
    log = data_dir.with_name(data_dir.name + f"-{time.monotonic_ns()}.log")
    args = [sys.executable, "-m", "tests.fake_server"]
    args += [f"--fsize-limit={fsize_limit}"] if fsize_limit else []
    args += ["--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir), *flags]
    repo = str(Path(__file__).resolve().parents[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": repo, **(env or {})})
    try:
        deadline = time.monotonic() + 60
        while not (ready := re.search(r"ready on (http://\S+)", log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                output = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the fake server did not start:\n{output}")
            time.sleep(0.05)
        yield ServingProcess(ready.group(1), proc, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
