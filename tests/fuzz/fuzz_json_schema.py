"""The request schemas (protocol.schema, protocol.openai_schema): any body -> valid parameters or a
400/415 that renders, never another exception.

Input: one byte choosing the entry point (PAI speech, OpenAI speech, WebSocket run-task parameters,
list query), then the body (for run-task: a JSON array [parameters, model]).
"""
from __future__ import annotations

import json

from tests.fuzz.harness import fuzz, instrumented, take_seed

with instrumented(__name__):
    from tests.fuzz.drive_schema import run_list_query, run_openai, run_speech, run_ws_parameters


def _ws(body: bytes) -> None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return  # the machine refuses these before the schema sees them (fuzz_ws_tasks)
    parameters, model = (value + [None, None])[:2] if isinstance(value, list) else (value, "cosyvoice-v2")
    run_ws_parameters(parameters, model)


def one_input(data: bytes) -> None:
    which, body = take_seed(data)
    [run_speech, run_openai, _ws, lambda b: run_list_query(b.decode("latin-1"))][which % 4](body)


if __name__ == "__main__":
    fuzz(one_input)
