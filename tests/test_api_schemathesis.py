"""schemathesis against a live `python -m server` on the tiny model, from the server's own description.

The run: tests/schemathesis.toml (a fixed seed; the examples, coverage and fuzzing phases, 100 examples per
operation and phase, 25 for the two speech operations: ~1,300 cases, ~70 of them through the engine; every
response check that fits this API; 30 s per request), started on GET /openapi.json with the token, as
`st run` by hand would. The server runs `--max-text-chars 4`: the document's maxLength follows, so each
synthesis stays near a second on the tiny model. Voices are uploaded first and named to
tests/schemathesis_hooks.py, so most speech cases reach the engine and the encoders.

Afterwards: the run found nothing (a documented 4xx or a 2xx that matches the document, never a 5xx, never
a timeout); speech reached the engine on both speech routes; the server logged no error (an error after a
stream began is no status code, so only the log shows it). A failure prints schemathesis' report, with a
curl line for each case.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench.servers import REPO, SpawnedServer, spawn_server
from tests.server_helpers import wav_bytes

CONFIG = Path(__file__).with_name("schemathesis.toml")
MAX_TEXT_CHARS = 4  # the served maxLength: a synthesis on the tiny model stays near a second
RUN_TIMEOUT_S = 600  # the run itself takes two to three minutes on 2 cores; this only stops a hang


@pytest.fixture(scope="module")
def server() -> Iterator[SpawnedServer]:
    with spawn_server(extra=["--warmup", "0", "--max-text-chars", str(MAX_TEXT_CHARS)],
                      startup_timeout_s=120) as srv:
        yield srv


def _upload(srv: SpawnedServer, filename: str) -> str:
    r = requests.post(f"{srv.url}/api/v1/audio/reference_audio", headers={"Authorization": f"Bearer {srv.token}"},
                      files={"file": (filename, wav_bytes(1.0))}, data={"text": "hi"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _requests_total(srv: SpawnedServer, route: str, status: int) -> int:
    text = requests.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {srv.token}"}, timeout=10).text
    found = re.search(rf'^cosyserve_requests_total{{route="{route}",status="{status}"}} (\d+)', text,
                      re.MULTILINE)
    return int(found.group(1)) if found else 0


def test_schemathesis_finds_nothing(server: SpawnedServer) -> None:
    voice = _upload(server, "narrator.wav")  # by id, and by name on the OpenAI route
    doomed = _upload(server, "doomed.wav")  # GET/DELETE by id may delete this one
    env = {**os.environ, "PYTHONPATH": str(REPO), "COSYSERVE_ST_VOICES": f"{voice},narrator",
           "COSYSERVE_ST_DOOMED": doomed}
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color", "run",
           f"{server.url}/openapi.json", "--header", f"Authorization: Bearer {server.token}"]
    run = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-30_000:]
    generated = re.search(r"(\d+) generated, \1 passed", report)
    assert generated and int(generated.group(1)) >= 300, report[-5_000:]  # a real run, not an empty one
    for route in ("speech", "openai_speech"):
        assert _requests_total(server, route, 200) >= 10, route  # the engine and encoders were reached
    log = server.log_path.read_text(errors="replace")
    assert " ERROR " not in log and "Traceback" not in log, log[-10_000:]
