"""Text normalisation in a child process.

Normalisation (wetext and the sentence splitter) is pure Python: on a worker thread it holds the GIL
for the whole ~1 s of a 4,300-character text, and the decode thread, which must take the GIL back after
every torch op, then crawls as if the text were normalised on it (`bench.stall` measured both). A
child process has its own interpreter: the caller only waits for the ids.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from frontend.text_normalize import TextFrontend

_frontend: TextFrontend | None = None  # the child's own, built once by its initializer


def _start(model_dir: str, use_wetext: bool) -> None:
    global _frontend
    _frontend = TextFrontend(Path(model_dir), use_wetext=use_wetext)
    _frontend.normalize("预热 warm-up 1。")  # load wetext's grammars now, not on the first request


def _pieces(text: str) -> list[list[int]]:
    assert _frontend is not None
    return _frontend.encode_pieces(text)


def _whole(text: str) -> list[int]:
    assert _frontend is not None
    return _frontend.encode_whole(text)


class TextProcess:
    """`TextFrontend.encode_pieces` / `encode_whole`, computed by one child process (thread-safe)."""

    def __init__(self, model_dir: Path, use_wetext: bool = True, workers: int = 1) -> None:
        # spawn, not fork: the parent runs torch's and the server's threads, which a fork would copy mid-flight
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(str(model_dir), use_wetext))
        self._pool.submit(_whole, "").result()  # started and warm before the first request

    def encode_pieces(self, text: str) -> list[list[int]]:
        return self._pool.submit(_pieces, text).result()

    def encode_whole(self, text: str) -> list[int]:
        return self._pool.submit(_whole, text).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
