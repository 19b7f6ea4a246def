"""The WebSocket task protocol (protocol.ws_tasks.WsTaskMachine): any script of client messages (valid,
invalid or garbage) and engine outcomes keeps the contract (tests/fuzz/ws_contract.py), never an exception.

Input: a script of one-byte steps with their arguments (tests/fuzz/drive_ws_tasks.py, `run_script`).
"""
from __future__ import annotations

from tests.fuzz.harness import fuzz, instrumented

with instrumented(__name__):
    from tests.fuzz.drive_ws_tasks import run_script


def one_input(data: bytes) -> None:
    run_script(data)


if __name__ == "__main__":
    fuzz(one_input)
