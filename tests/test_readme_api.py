"""README "Use the API" and "OpenAI-compatible API": their examples run against a live server, their
response shapes match live responses.

The section's fenced blocks are marked with HTML comments:
- `<!-- readme-test -->` before a bash block: the bash blocks run in order in one shell (they share
  $URL, $TOKEN, $VOICE and their files), with curl and python3, against a server on a free port;
- `<!-- readme-test: NAME.py -->` before a python block: saved as NAME.py for the bash blocks to run;
- `<!-- readme-shape: NAME -->` before a JSON block: a trimmed real response, compared key by key
  with the live response of that kind.
The README's `127.0.0.1:8000` and `change-me` become the test server's address and token.
The server runs the fake engine (220 Hz sine, 50 ms per character) with the real encoders, so the
files the examples write are real WAV / MP3 of a known length and pitch.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import soundfile as sf
import websocket

from tests.fakes import SAMPLE_RATE, SAMPLES_PER_CHAR, FakeEngine
from tests.server_helpers import (
    AUTH,
    TOKEN,
    continue_task,
    finish_task,
    run_task,
    running_server,
    speech_body,
    upload,
    wav_bytes,
)

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Use the API"
README_ADDR = "127.0.0.1:8000"
README_TOKEN = "change-me"
SHAPES = {"reference_audio", "delete", "error", "speech", "sse_event",
          "ws_task_started", "ws_result_generated", "ws_task_finished", "ws_task_failed"}
SCRIPTS = {"sse_audio.py", "ws_client.py"}
OPENAI_HEADING = "## OpenAI-compatible API"
OPENAI_SHAPES = {"openai_sse_delta", "openai_sse_done", "openai_error", "openai_voices"}
OPENAI_SCRIPTS = {"openai_client.py"}
BLOCK_RE = re.compile(r"<!--\s*readme-(test|shape)(?::\s*([\w.-]+))?\s*-->\s*\n```(\w+)\n(.*?)^```[ \t]*$",
                      re.DOTALL | re.MULTILINE)
MARK = "@@readme-block {}@@"
SECONDS_PER_CHAR = SAMPLES_PER_CHAR / SAMPLE_RATE


@dataclass(frozen=True)
class Block:
    kind: str  # "test" | "shape"
    name: str | None
    lang: str
    code: str


def section(heading: str = HEADING) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else len(text)]


def blocks(heading: str = HEADING) -> list[Block]:
    return [Block(kind, name, lang, code) for kind, name, lang, code in BLOCK_RE.findall(section(heading))]


@pytest.mark.parametrize("heading,shapes,scripts,bash_blocks", [
    (HEADING, SHAPES, SCRIPTS, 5), (OPENAI_HEADING, OPENAI_SHAPES, OPENAI_SCRIPTS, 3)])
def test_section_has_the_marked_blocks(heading: str, shapes: set[str], scripts: set[str], bash_blocks: int) -> None:
    found = blocks(heading)
    assert {b.name for b in found if b.kind == "shape"} == shapes
    assert all(b.lang == "json" for b in found if b.kind == "shape")
    assert {b.name for b in found if b.kind == "test" and b.name} == scripts
    assert all(b.lang == "python" for b in found if b.kind == "test" and b.name)
    assert sum(b.kind == "test" and b.lang == "bash" and not b.name for b in found) >= bash_blocks
    # every fenced block of the section is either run or compared: nothing in it can go stale unnoticed
    assert section(heading).count("```") == 2 * len(found)


# ---- running the examples ------------------------------------------------------------------------

def _localise(code: str, port: int) -> str:
    return code.replace(README_ADDR, f"127.0.0.1:{port}").replace(README_TOKEN, TOKEN)


def _run_examples(port: int, workdir: Path, heading: str = HEADING) -> list[str]:
    """Write the scripts, run the bash blocks in one shell; -> each bash block's stdout."""
    found = blocks(heading)
    bash = [b.code for b in found if b.kind == "test" and b.lang == "bash" and not b.name]
    assert any(README_ADDR in b.code for b in found if b.kind == "test")
    assert any(README_TOKEN in b.code for b in found if b.kind == "test")
    for b in found:
        if b.kind == "test" and b.name:
            (workdir / b.name).write_text(_localise(b.code, port), encoding="utf-8")
    script = "set -euo pipefail\n" + "".join(
        f"echo '{MARK.format(i)}'; echo '{MARK.format(i)}' >&2\n{_localise(code, port)}\n"
        for i, code in enumerate(bash))
    (workdir / "readme.sh").write_text(script, encoding="utf-8")
    bindir = workdir / "bin"  # `python3` is this interpreter (its packages: websocket-client, openai)
    bindir.mkdir()
    (bindir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bindir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    proc = subprocess.run(["bash", "readme.sh"], check=False, cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"README examples failed (rc {proc.returncode})\n--- stdout\n{proc.stdout}" \
                                 f"\n--- stderr\n{proc.stderr}"
    outputs = re.split(r"^@@readme-block \d+@@\n", proc.stdout, flags=re.MULTILINE)[1:]
    assert len(outputs) == len(bash), proc.stdout
    return outputs


def _json_lines(out: str) -> list[Any]:
    return [json.loads(line) for line in out.splitlines() if line.startswith(("{", "["))]


def _pitch_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def _check_audio(path: Path, fmt: str, seconds: float, tolerance_s: float = 0.0) -> None:
    info = sf.info(str(path))
    assert info.format == fmt and info.samplerate == 24000 and info.channels == 1, info
    samples, rate = sf.read(str(path), dtype="float32")
    assert abs(len(samples) / rate - seconds) <= tolerance_s + 1e-9, (path.name, len(samples) / rate, seconds)
    assert abs(_pitch_hz(samples, rate) - 220.0) < 5.0  # the fake engine's sine came through intact


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None,
                    reason="the README examples use curl and bash; not installed here")
def test_readme_examples_run(tmp_path: Path) -> None:
    engine = FakeEngine()
    work = tmp_path / "work"
    work.mkdir()
    with running_server(tmp_path / "data", engine) as srv:
        out = _run_examples(srv.port, work)

        # upload: the object for the file sent; list and get show it
        voice = json.loads((work / "voice.json").read_text(encoding="utf-8"))
        prompt = sf.info(str(work / "prompt.wav"))
        assert (prompt.samplerate, prompt.channels, prompt.duration) == (16000, 1, 3.0)
        assert voice["filename"] == "prompt.wav" and voice["bytes"] == (work / "prompt.wav").stat().st_size
        assert voice["text"].strip() and str(uuid.UUID(voice["id"])) == voice["id"]
        listed, got = _json_lines(out[1])
        assert voice in listed and got == voice

        # the three syntheses, each as the engine saw it
        one_shot = next(j for j in engine.jobs if not j.stream)
        sse = next(j for j in engine.jobs if j.stream and j.text is not None)
        assert any(j.text is None for j in engine.jobs)  # the WebSocket task ran as a duplex job
        speech = json.loads((work / "speech.json").read_text(encoding="utf-8"))
        assert speech["usage"] == (work / "out.wav").stat().st_size
        _check_audio(work / "out.wav", "WAV", len(one_shot.text) * SECONDS_PER_CHAR)
        assert "finish_reason=stop" in out[3].splitlines()[-1]
        _check_audio(work / "stream.mp3", "MP3", len(sse.text) * SECONDS_PER_CHAR, tolerance_s=0.1)
        finished = out[4].splitlines()[-1]
        assert finished.startswith("task-finished")
        characters = int(re.search(r"'characters': (\d+)", finished).group(1))
        _check_audio(work / "ws.wav", "WAV", characters * SECONDS_PER_CHAR)

        # delete: the document's answer, then the id is gone
        deleted, missing = _json_lines(out[5])
        assert deleted == {"code": "OK", "message": f"reference audio: {voice['id']} deleted.", "data": {}}
        assert missing["code"] == "NotFound"
        r = requests.get(f"{srv.url}/api/v1/audio/reference_audio/{voice['id']}", headers=AUTH, timeout=10)
        assert r.status_code == 404
        r = requests.get(f"{srv.url}/api/v1/audio/reference_audio", headers=AUTH, timeout=10)
        assert r.status_code == 200 and voice["id"] not in {v["id"] for v in r.json()}


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None,
                    reason="the README examples use curl and bash; not installed here")
def test_openai_readme_examples_run(tmp_path: Path) -> None:
    engine = FakeEngine()
    work = tmp_path / "work"
    work.mkdir()
    (work / "prompt.wav").write_bytes(wav_bytes(3.0, 16000))  # what "Use the API" wrote before
    with running_server(tmp_path / "data", engine) as srv:
        out = _run_examples(srv.port, work, OPENAI_HEADING)

    (voices,) = _json_lines(out[0])
    assert [(v["name"], v["object"]) for v in voices["data"]] == [("narrator", "audio.voice")]
    assert [j.stream for j in engine.jobs] == [False, True, False, True, True]  # stream_format or not
    flac, pcm, opus, mp3, sse = (len(j.text) * SECONDS_PER_CHAR for j in engine.jobs)
    _check_audio(work / "curl.flac", "FLAC", flac)
    assert (work / "curl.pcm").stat().st_size == round(pcm * SAMPLE_RATE) * 2
    _check_audio(work / "openai.opus", "OGG", opus, tolerance_s=0.01)
    _check_audio(work / "openai_stream.mp3", "MP3", mp3, tolerance_s=0.1)
    _check_audio(work / "openai_sse.wav", "WAV", sse)
    assert out[2].splitlines()[-1].startswith("usage: {'input_tokens': ")


# ---- response shapes -----------------------------------------------------------------------------

def _skeleton(value: Any) -> Any:
    """Keys all the way down (a list: its first element); leaves are just "value"."""
    if isinstance(value, dict):
        return {k: _skeleton(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_skeleton(value[0])] if value else []
    return "value"


def _live_shapes(url: str) -> dict[str, Any]:
    live: dict[str, Any] = {}
    r = upload(requests, url)
    live["reference_audio"] = r.json()
    voice = live["reference_audio"]["id"]
    live["speech"] = requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice),
                                   timeout=10).json()
    with requests.post(f"{url}/api/v1/audio/speech", headers=AUTH, json=speech_body(voice, stream=True),
                       stream=True, timeout=10) as r:
        first = next(line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: "))
        live["sse_event"] = json.loads(first[len("data: "):])
    ws = websocket.create_connection(url.replace("http://", "ws://") + "/api-ws/v1/audio/speech",
                                     header=AUTH, timeout=10)
    try:
        ws.send(run_task("t1", voice, debug=False))
        live["ws_task_started"] = json.loads(ws.recv())
        ws.send(continue_task("t1", "hello there"))
        ws.send(finish_task("t1"))
        while True:
            event = json.loads(ws.recv())
            name = event["header"]["event"]
            if name == "result-generated":
                live.setdefault("ws_result_generated", event)
            else:
                live["ws_task_finished"] = event
                break
        ws.send(run_task("t2", "no-such-voice"))
        live["ws_task_failed"] = json.loads(ws.recv())
    finally:
        ws.close()
    live["delete"] = requests.delete(f"{url}/api/v1/audio/reference_audio/{voice}", headers=AUTH,
                                     timeout=10).json()
    live["error"] = requests.get(f"{url}/api/v1/audio/reference_audio/{voice}", headers=AUTH,
                                 timeout=10).json()
    return live


def test_readme_response_shapes_match_live_responses(tmp_path: Path) -> None:
    shown = {b.name: json.loads(b.code) for b in blocks() if b.kind == "shape"}
    with running_server(tmp_path / "data", FakeEngine()) as srv:
        live = _live_shapes(srv.url)
    for name in SHAPES:
        assert _skeleton(shown[name]) == _skeleton(live[name]), (name, shown[name], live[name])
    events = {name: shown[name]["header"]["event"] for name in SHAPES if name.startswith("ws_")}
    assert events == {name: live[name]["header"]["event"] for name in events}
    assert shown["sse_event"]["output"]["finish_reason"] is None and shown["sse_event"]["error"] is None


def _live_openai_shapes(url: str) -> dict[str, Any]:
    upload(requests, url, filename="narrator.wav")
    live: dict[str, Any] = {"openai_voices": requests.get(f"{url}/v1/audio/voices", headers=AUTH, timeout=10).json()}
    body = {"model": "tts-1", "input": "hello there", "voice": "narrator", "response_format": "wav",
            "stream_format": "sse"}
    with requests.post(f"{url}/v1/audio/speech", headers=AUTH, json=body, stream=True, timeout=10) as r:
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: ")]
    live["openai_sse_delta"], live["openai_sse_done"] = events[0], events[-1]
    live["openai_error"] = requests.post(f"{url}/v1/audio/speech", headers=AUTH, json={**body, "voice": "nova"},
                                         timeout=10).json()
    return live


def test_readme_openai_shapes_match_live_responses(tmp_path: Path) -> None:
    shown = {b.name: json.loads(b.code) for b in blocks(OPENAI_HEADING) if b.kind == "shape"}
    with running_server(tmp_path / "data", FakeEngine()) as srv:
        live = _live_openai_shapes(srv.url)
    for name in OPENAI_SHAPES:
        assert _skeleton(shown[name]) == _skeleton(live[name]), (name, shown[name], live[name])
    assert shown["openai_error"] == live["openai_error"]
    assert [shown[n]["type"] for n in ("openai_sse_delta", "openai_sse_done")] == \
        ["speech.audio.delta", "speech.audio.done"]
