"""The split with real processes on loopback and the tiny model: `python -m server --role backend` and
`--role frontend` (in a wrapper that reports, as it exits, whether torch was ever imported). An upload, a
non-stream request, an SSE request and a WS duplex task go through the frontend; the frontend never
loaded torch; the backend refuses a wrong internal token."""
from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import soundfile as sf
import websocket
from sseclient import SSEClient

from bench.servers import stop, wait_healthy
from protocol import internal as wire
from tests.server_helpers import AUTH, TOKEN, continue_task, finish_task, run_task, speech_body, upload

REPO = Path(__file__).resolve().parents[1]
INTERNAL = "internal-secret"
# Runs the real CLI; after the drain (SIGTERM) it says whether torch is in sys.modules.
FRONTEND_WRAPPER = ("import sys\nfrom server.__main__ import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
                    "    print('TORCH_LOADED', 'torch' in sys.modules, flush=True)\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], log: Path, code: str | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "server", *args]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def split(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("split")
    bport, fport = _free_port(), _free_port()
    common = ["--host", "127.0.0.1", "--model-dir", str(tiny_model_dir), "--internal-token", INTERNAL,
              "--text-process", "0", "--workers", "2"]
    backend = _spawn(["--role", "backend", "--port", str(bport), "--data-dir", str(tmp / "b"), "--warmup", "0",
                      *common], tmp / "backend.log")
    frontend = _spawn(["--role", "frontend", "--port", str(fport), "--data-dir", str(tmp / "f"), "--token", TOKEN,
                       "--backend", f"http://127.0.0.1:{bport}", *common], tmp / "frontend.log", FRONTEND_WRAPPER)
    try:
        wait_healthy(f"http://127.0.0.1:{bport}", backend, 120)
        wait_healthy(f"http://127.0.0.1:{fport}", frontend, 60)
        yield {"backend": f"http://127.0.0.1:{bport}", "frontend": f"http://127.0.0.1:{fport}", "fport": fport,
               "bport": bport, "frontend_proc": frontend, "frontend_log": tmp / "frontend.log"}
    finally:
        stop(frontend)
        stop(backend)


@pytest.fixture(scope="module")
def voice(split: dict[str, object]) -> str:
    r = upload(requests, str(split["frontend"]))
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_non_stream_and_sse_through_the_frontend(split: dict[str, object], voice: str) -> None:
    url = str(split["frontend"])
    r = requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, text="hello world"),
                      timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    wav, rate = sf.read(io.BytesIO(base64.b64decode(body["output"]["audio"]["data"])), dtype="float32")
    assert rate == 24000 and wav.ndim == 1 and len(wav) > 0
    r = requests.post(f"{url}/api/v1/audio/speech", headers=AUTH,
                      json=speech_body(voice, text="hello world", stream=True, debug=True), stream=True, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(m.data) for m in SSEClient(r).events()]
    assert len(events) >= 2 and events[-1]["output"]["finish_reason"] == "stop"
    first = events[0]["metrics"]
    assert {"speech_len", "server_cost_time", "generate_time", "first_package_time"} <= set(first)
    assert first["detail"]["llm_tokens"] > 0  # the backend's per-chunk metrics came across


def test_text_with_nothing_to_speak_is_refused_by_the_frontend_as_by_role_all(split: dict[str, object],
                                                                             voice: str) -> None:
    r = requests.post(f"{split['frontend']}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, text="。。。"),
                      timeout=30)
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter", r.text


def test_ws_duplex_through_the_frontend(split: dict[str, object], voice: str) -> None:
    ws = websocket.create_connection(f"ws://127.0.0.1:{split['fport']}/api-ws/v1/audio/speech", header=AUTH,
                                     timeout=60)
    try:
        ws.send(run_task("t1", voice, output_format="pcm"))
        assert json.loads(ws.recv())["header"]["event"] == "task-started"
        for text in ("hello there, ", "how are you today?"):
            ws.send(continue_task("t1", text))
        ws.send(finish_task("t1"))
        events, audio = [], b""
        while not events or events[-1] not in ("task-finished", "task-failed"):
            msg = json.loads(ws.recv())
            events.append(msg["header"]["event"])
            if events[-1] == "result-generated":
                audio += base64.b64decode(msg["payload"]["output"]["audio"]["data"])
        assert events[-1] == "task-finished", events
        assert len(audio) > 0 and len(audio) % 2 == 0
    finally:
        ws.close()


def test_the_backend_refuses_a_wrong_internal_token(split: dict[str, object]) -> None:
    url = str(split["backend"])
    assert requests.get(f"{url}{wire.HEALTH_PATH}", timeout=5).status_code == 200
    r = requests.post(f"{url}{wire.FEATURES_PATH}", headers={"Authorization": "Bearer wrong"}, data=b"x", timeout=5)
    assert r.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"ws://127.0.0.1:{split['bport']}{wire.JOBS_PATH}",
                                    header={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert err.value.status_code == 401


def test_zz_the_frontend_never_imported_torch(split: dict[str, object], voice: str) -> None:
    """Runs last in the module (name): after the upload and the requests above, stop the frontend and read
    what its wrapper printed."""
    proc = split["frontend_proc"]
    assert isinstance(proc, subprocess.Popen)
    stop(proc)
    log = Path(str(split["frontend_log"])).read_text(errors="replace")
    assert "TORCH_LOADED False" in log, log[-3000:]
