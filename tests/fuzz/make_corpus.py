"""Writes the committed corpus: `python -m tests.fuzz.make_corpus` (tests/fuzz/corpus/<target>/).

`seed-*`: valid inputs in each harness's input format, made with real clients (h11, wsproto, requests),
so the fuzzer starts from deep inside each parser. `regress-*`: the input of every bug fixed, so every
run (the CI's short one included) replays them first.
"""
from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import h11
import requests
from wsproto.events import CloseConnection, Message, Ping

from tests.fuzz.drive_ws import open_session
from tests.fuzz.drive_ws_tasks import PARAMS, run_task

CORPUS = Path(__file__).resolve().parent / "corpus"
SEED = b"\x07"  # the split seed byte most harnesses read first


def http_request(method: str, target: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> bytes:
    client = h11.Connection(h11.CLIENT)
    headers = [("host", "x"), *(headers or [])]
    if body and not any(k == "transfer-encoding" for k, _ in headers):
        headers.append(("content-length", str(len(body))))
    out = client.send(h11.Request(method=method, target=target, headers=headers)) or b""
    if body:
        out += client.send(h11.Data(data=body)) or b""
    return out + (client.send(h11.EndOfMessage()) or b"")


def form(files: dict, data: dict) -> tuple[str, bytes]:
    req = requests.Request("POST", "http://x/", files=files, data=data).prepare()
    content_type, body = req.headers["Content-Type"], req.body
    assert isinstance(body, bytes)
    boundary = content_type.partition("boundary=")[2]  # random: fixed here so the corpus is reproducible
    return content_type.replace(boundary, "seedboundary"), body.replace(boundary.encode(), b"seedboundary")


def http_seeds() -> dict[str, bytes]:
    speech = json.dumps({"model": "CosyVoice2-0.5B", "input": {"text": "hi", "mode": "fast_replication",
                                                                "reference_audio_id": "r"}}).encode()
    ws_upgrade = [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-version", "13"),
                  ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]
    return {
        "get": http_request("GET", "/health?x=1"),
        "post-json": http_request("POST", "/api/v1/audio/speech", speech, [("content-type", "application/json")]),
        "chunked": http_request("POST", "/p", b"hello world", [("transfer-encoding", "chunked")]),
        "pipelined-head": http_request("HEAD", "/ready") + http_request("GET", "/") + http_request("POST", "/", b"x"),
        "expect-continue": http_request("POST", "/", b"abc", [("expect", "100-continue")]),
        "close": http_request("GET", "/", headers=[("connection", "close")]) + http_request("GET", "/"),
        "http10": b"GET / HTTP/1.0\r\n\r\n",
        "http21": http_request("GET", "/") + b"GET / HTTP/2.1\r\nhost: x\r\n\r\n",  # h11 reads any d.d
        "upgrade": http_request("GET", "/api-ws/v1/audio/speech", headers=ws_upgrade) + b"\x81\x80abcd",
    }


def multipart_seeds() -> dict[str, bytes]:
    ctype, body = form({"file": ("voice.wav", b"RIFF\x00\x01")}, {"text": "希望你以後"})
    ctype2, body2 = form({"file": ("a.pcm", b"\x00" * 10)}, {"sample_rate": "16000", "name": "v"})
    raw = (b"--B0UNDARY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"\xe4\xb8\xad.pcm\"\r\n"
           b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\r\n--B0UNDARY--\r\n")
    return {"requests": ctype.encode() + b"\n" + body, "pcm": ctype2.encode() + b"\n" + body2, "curl": raw}


def ws_seeds() -> dict[str, bytes]:
    def frames(binary: bool, *events: object) -> bytes:
        client, _ = open_session(binary)
        return b"".join(client.send(e) for e in events)  # type: ignore[arg-type]

    return {
        "text": b"\x00" + frames(False, Message(data="hello"), Ping(b"p"), Message(data="ab", message_finished=False),
                                 Message(data="cd"), CloseConnection(1000, "bye")),
        "binary": b"\x01" + frames(True, Message(data=b"\x00\x01"), Message(data="x"), Ping(b"")),
        "too-big": b"\x00" + frames(False, Message(data="x" * 70)),
        "server-closed": b"\x02" + frames(False, Message(data="late"), CloseConnection(1000)),
    }


def script(*steps: tuple[int, ...] | bytes) -> bytes:
    return b"".join(bytes(s) if isinstance(s, tuple) else s for s in steps)


def ws_tasks_seeds() -> dict[str, bytes]:
    def raw(text: str) -> bytes:  # step 0: a client message as it is
        data = text.encode()
        assert len(data) < 64, text
        return bytes([0, len(data)]) + data

    run = run_task("t1", PARAMS)
    return {
        # run-task t1, engine: started; continue "hello"; finish; engine: audio, finished
        "one-task": script((1, 0, 0, 0), (4, 0), (2, 0, 0, 5), b"hello", (3, 0), (4, 0), (4, 1)),
        # run-task t1 with "hi"; finish before task-started; started, audio, finished; run-task t2
        "text-before-started": script((1, 0, 0, 1), (3, 0), (4, 0), (4, 0), (4, 1), (1, 1, 0, 0)),
        # finish idle; run t1; run t2 (foreign); continue t2; stale audio for "", run t1 again; connection lost
        "errors": script((3, 0), (1, 0, 0, 0), (1, 1, 0, 0), (2, 1, 1), (6, 2, 1), (1, 0, 0, 0), (7,)),
        "raw": raw('{"header":{"action":"run-task","task_id":"t1"}}') + raw("not json") + raw("[]")
        + bytes([0, 0]) + (b"" if len(run) > 63 else raw(run)),
        # odd texts, bad parameters, lone-surrogate and blank task ids, engine failure
        "odd": script((1, 0, 1, 0), (1, 0, 0, 3), (2, 0, 3), (1, 3, 0, 1), (1, 0, 0, 1), (5, 1), (2, 4, 5)),
    }


def json_schema_seeds() -> dict[str, bytes]:
    speech = {"model": "CosyVoice2-0.5B", "stream": False,
              "input": {"text": "hi", "mode": "natural_language_replication", "reference_audio_id": "r",
                        "instruct": "slowly", "sample_rate": 16000, "bit_rate": "384k", "volume": 2,
                        "speed": 1.5, "output_format": "mp3", "debug": True}}
    openai = {"model": "tts-1", "input": "hi", "voice": {"id": "v"}, "instructions": "calm", "speed": 4,
              "response_format": "opus", "stream_format": "sse", "stream": True}
    return {
        "speech": b"\x00" + json.dumps(speech).encode(),
        "openai": b"\x01" + json.dumps(openai).encode(),
        "ws": b"\x02" + json.dumps([PARAMS, "cosyvoice-v2"]).encode(),
        "list": b"\x03limit=5&order=asc",
    }


def sse_seeds() -> dict[str, bytes]:
    return {"text": SEED + "hi\n\r\r\n:data: \u2028\x00é中😀".encode("utf-16-le")}


def regressions() -> dict[str, dict[str, bytes]]:
    """One input per bug fixed (docs/faults.md, "Protocol, fuzzed"), in its harness's format."""
    malformed = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n"
    client, _ = open_session()
    inp = {"text": "hi", "mode": "fast_replication", "reference_audio_id": "r"}
    speech = {"model": "CosyVoice2-0.5B", "input": inp}
    return {
        "http": {  # an error after a HEAD; a HEAD answered streamed (drive_http streams every other request)
            "head-then-malformed": SEED + http_request("HEAD", "/ready") + malformed,
            "head-streamed": SEED + http_request("GET", "/") + http_request("HEAD", "/stream"),
        },
        "multipart": {"long-boundary": SEED + b"multipart/form-data; boundary=" + b"b" * 257 + b"\n--" + b"b" * 257},
        "ws": {"ping-after-our-close": SEED + b"\x02" + client.send(Ping(b"p")) + client.send(CloseConnection(1000))},
        "ws_tasks": {  # a lone-surrogate task id; a volume past float; nesting past the recursion limit
            "surrogate-task-id": script((2, 3, 1), (1, 3, 0, 0), (1, 0, 0, 0), (3, 3)),
            "huge-volume": script((1, 0, 3, 0)),
            "deep-nesting": script((0, 192), (1, 0, 0, 0), (0, 193)),
        },
        "json_schema": {
            "huge-volume": b"\x00" + json.dumps({**speech, "input": {**inp, "volume": 10 ** 400}}).encode(),
            "huge-speed": b"\x01" + json.dumps({"model": "tts-1", "input": "hi", "voice": "v",
                                                 "speed": -10 ** 400}).encode(),
            "deep-array": b"\x00" + b"[" * 1020,
            "surrogate-text": b"\x00" + json.dumps({**speech, "input": {**inp, "text": "\ud800"}}).encode(),
        },
    }


def main() -> None:
    with mock.patch("os.urandom", lambda n: bytes(range(1, n + 1))):  # wsproto's masks: reproducible files
        write_corpus()


def write_corpus() -> None:
    seeds = {"http": {k: SEED + v for k, v in http_seeds().items()},
             "multipart": {k: SEED + v for k, v in multipart_seeds().items()},
             "ws": {k: SEED + v for k, v in ws_seeds().items()},
             "ws_tasks": ws_tasks_seeds(), "json_schema": json_schema_seeds(), "sse": sse_seeds()}
    regress = regressions()
    for target, files in seeds.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("seed-*"), *folder.glob("regress-*")]:
            old.unlink()
        for name, data in files.items():
            (folder / f"seed-{name}").write_bytes(data)
        for name, data in regress.get(target, {}).items():
            (folder / f"regress-{name}").write_bytes(data)
        print(f"{target}: {len(files)} seeds, {len(regress.get(target, {}))} regressions")


if __name__ == "__main__":
    main()
