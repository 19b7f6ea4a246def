"""The 3,000-character text (tests/long_text.py) through the server: every normalised sentence piece is
spoken, in order, and SSE, the one-shot file and the WebSocket carry the same text.

The engine is a fake whose audio says what it speaks: the real TextPreparer (tiny model's tokenizer,
wetext) prepares each job exactly as the server's engine would, and piece i's audio is a frame holding
i and the piece's text decoded from its token ids. Raw PCM at the engine's rate passes the output
pipeline unchanged (no resampling, gain 1), so the client reads the frames back from what it received.
A WebSocket text is not normalised (upstream's bistream takes text as it comes); its frames are what
the server pushed to the engine: each continue-task text sentence by sentence. No sleeps: a few seconds.
"""
from __future__ import annotations

import base64
import itertools
import json
import queue
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import websocket
from sseclient import SSEClient

from frontend.prepare import TextPreparer
from frontend.split import MAX_PIECE_LEN
from frontend.text_normalize import TextFrontend
from scheduler.jobs import AudioChunk, ChunkMetrics, EngineStats, EventSink, Finished, PreparedJob, SpeechJob
from tests.long_text import TEXT
from tests.server_helpers import (
    AUTH,
    TOKEN,
    continue_task,
    finish_task,
    run_task,
    running_server,
    speech_body,
    upload,
)

SAMPLE_RATE = 24000
START, END = 30000, 31000  # frame marks; between them the piece index, then the text's UTF-8 bytes
WS_PIECES = (0, 137, 401, 402, 1290, 1777, 2500, len(TEXT))  # continue-task cuts, mid-sentence on purpose


def frame(index: int, text: str) -> np.ndarray:
    """Samples whose int16 values are exactly the frame's values."""
    return np.array([START, index, *text.encode("utf-8"), END], np.float32) / 32767.0


def read_frames(pcm: bytes) -> list[tuple[int, str]]:
    values = np.frombuffer(pcm, "<i2").tolist()
    frames, i = [], 0
    while i < len(values):
        assert values[i] == START, f"no frame starts at sample {i}"
        end = values.index(END, i + 2)
        frames.append((values[i + 1], bytes(values[i + 2:end]).decode("utf-8")))
        i = end + 1
    return frames


class _TaggedJob:
    """JobControl of one job: its frames from a thread; a duplex job's frames are its pushes."""

    def __init__(self, engine: TaggingEngine, prepared: PreparedJob, sink: EventSink) -> None:
        self.engine, self.prepared, self.sink = engine, prepared, sink
        self.inbox: queue.Queue[tuple[int, ...] | None] = queue.Queue()
        self.cancelled = threading.Event()
        for ids in prepared.pieces:
            self.inbox.put(ids)
        if prepared.job.text is not None:
            self.inbox.put(None)
        threading.Thread(target=self._run, daemon=True).start()

    def push_tokens(self, ids) -> None:
        self.inbox.put(tuple(ids))

    def finish_text(self) -> None:
        self.inbox.put(None)

    def cancel(self) -> None:
        self.cancelled.set()
        self.inbox.put(None)

    def _run(self) -> None:
        rid, samples = self.prepared.request_id, 0
        for index, ids in enumerate(iter(self.inbox.get, None)):
            pcm = frame(index, self.engine.frontend.decode(list(ids)))
            parts = np.array_split(pcm, 3) if self.prepared.job.stream else [pcm]  # a few chunks a piece
            for part in parts:
                if self.cancelled.is_set():
                    return
                self.sink(AudioChunk(rid, part, ChunkMetrics(generate_time_s=0.001, llm_tokens=len(ids))))
            samples += len(pcm)
        if not self.cancelled.is_set():
            self.sink(Finished(rid, total_samples=samples, llm_tokens=samples))


class TaggingEngine:
    sample_rate = SAMPLE_RATE

    def __init__(self, frontend: TextFrontend) -> None:
        self.frontend = frontend
        self.preparer = TextPreparer(frontend)

    def prepare(self, job: SpeechJob) -> PreparedJob:
        return self.preparer.prepare(job)

    def encode_text(self, text: str) -> list[int]:
        return self.preparer.encode(text)

    def submit(self, prepared: PreparedJob, sink: EventSink) -> _TaggedJob:
        return _TaggedJob(self, prepared, sink)

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=0, kv_used_tokens=0, kv_total_tokens=1, last_decode_batch=0,
                           last_flow_batch=0, last_vocoder_batch=0, steps=0)

    def warm_voice(self, voice) -> bool:  # nothing to precompute
        return False

    def can_admit(self) -> bool:
        return True

    def shutdown(self, deadline_s: float) -> None:
        pass


@pytest.fixture(scope="module")
def frontend(tiny_model_dir: Path) -> TextFrontend:
    return TextFrontend(tiny_model_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, frontend: TextFrontend) -> Iterator:
    with running_server(tmp_path_factory.mktemp("data"), TaggingEngine(frontend)) as srv:  # type: ignore[arg-type]
        yield srv


@pytest.fixture(scope="module")
def voice(server) -> str:
    r = upload(requests, server.url)
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def expected(frontend: TextFrontend) -> list[tuple[int, str]]:
    """Every normalised sentence piece of the text, numbered in order: what must be spoken."""
    return list(enumerate(frontend.split(TEXT).spoken))


def _body(voice: str, stream: bool) -> dict:
    return speech_body(voice, text=TEXT, stream=stream, output_format="pcm", sample_rate=SAMPLE_RATE)


def test_sse_speaks_every_normalised_piece_in_order(server, voice: str, expected: list) -> None:
    r = requests.post(f"{server.url}/api/v1/audio/speech", headers=AUTH, json=_body(voice, True), stream=True,
                      timeout=60)
    assert r.status_code == 200, r.text
    events = [json.loads(m.data) for m in SSEClient(r).events()]
    assert [e["error"] for e in events] == [None] * len(events)
    assert events[-1]["output"]["finish_reason"] == "stop"
    frames = read_frames(b"".join(base64.b64decode(e["output"]["audio"]["data"]) for e in events))
    assert frames == expected
    assert len(expected) > 30 and all(len(text) <= MAX_PIECE_LEN for _, text in frames)


def test_the_one_shot_file_holds_the_same_pieces(server, voice: str, expected: list) -> None:
    r = requests.post(f"{server.url}/api/v1/audio/speech", headers=AUTH, json=_body(voice, False), timeout=60)
    assert r.status_code == 200, r.text
    assert read_frames(base64.b64decode(r.json()["output"]["audio"]["data"])) == expected


def test_the_websocket_speaks_all_the_text_sent_in_pieces_in_order(server, voice: str) -> None:
    task = str(uuid.uuid4())
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/api-ws/v1/audio/speech",
                                     header=[f"Authorization: Bearer {TOKEN}"], timeout=30)
    try:
        ws.send(run_task(task, voice, output_format="pcm", sample_rate=SAMPLE_RATE, debug=False))
        assert json.loads(ws.recv())["header"]["event"] == "task-started"
        for start, end in itertools.pairwise(WS_PIECES):
            ws.send(continue_task(task, TEXT[start:end]))
        ws.send(finish_task(task))
        audio, event = b"", ""
        while event != "task-finished":
            msg = json.loads(ws.recv())
            event = msg["header"]["event"]
            assert event in ("result-generated", "task-finished"), msg
            if event == "result-generated":
                audio += base64.b64decode(msg["payload"]["output"]["audio"]["data"])
    finally:
        ws.close()
    frames = read_frames(audio)
    assert [i for i, _ in frames] == list(range(len(frames)))
    assert "".join(text for _, text in frames) == TEXT  # every character sent, once, in order
    assert all(len(text) <= MAX_PIECE_LEN for _, text in frames)  # pushed sentence by sentence
    assert msg["payload"]["usage"]["characters"] == len(TEXT)
