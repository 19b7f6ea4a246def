"""schemathesis hooks (tests/schemathesis.toml names this module): stored voices in the generated requests.

Random ids only ever reach "unknown voice". tests/test_api_schemathesis.py uploads voices before the run and
names them in the environment: COSYSERVE_ST_VOICES (ids or names for the speech bodies) and
COSYSERVE_ST_DOOMED (an id for GET/DELETE /api/v1/audio/reference_audio/{id}, which may delete it). Most
generated cases then name a voice that exists, so they reach the engine and the encoders with every format,
rate, speed and volume the document allows; the rest keep their random id (the documented 404/400).

A `map_case` hook, because the coverage phase applies case hooks only. The choice is a checksum of the
case, so the seed alone still decides the run. Only a non-empty string is replaced: a case
generated to be invalid stays invalid.
"""
from __future__ import annotations

import os
import zlib
from typing import Any

import schemathesis

VOICES = tuple(v for v in os.environ.get("COSYSERVE_ST_VOICES", "").split(",") if v)
DOOMED = os.environ.get("COSYSERVE_ST_DOOMED", "")
PAI_SPEECH = "/api/v1/audio/speech"
OPENAI_SPEECH = "/v1/audio/speech"
ONE_VOICE = "/api/v1/audio/reference_audio/{id}"


def _usable(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _pick(generated: str, case: Any, choices: tuple[str, ...]) -> str:
    """One of `choices`, or (one time in len + 1) the generated value itself; decided by a checksum of the
    whole case, as the coverage phase varies one field at a time around fixed values."""
    k = zlib.crc32(repr(case).encode("utf-8", "surrogatepass")) % (len(choices) + 1)
    return generated if k == len(choices) else choices[k]


def with_voice(body: Any, path: str) -> Any:
    """`body` with its voice field set to a stored voice where the generated one is a usable string."""
    if not VOICES or not isinstance(body, dict):
        return body
    inp = body.get("input")
    if path == PAI_SPEECH and isinstance(inp, dict) and _usable(inp.get("reference_audio_id")):
        return {**body, "input": {**inp, "reference_audio_id": _pick(inp["reference_audio_id"], body, VOICES)}}
    voice = body.get("voice")
    if path == OPENAI_SPEECH and _usable(voice):
        return {**body, "voice": _pick(voice, body, VOICES)}
    if path == OPENAI_SPEECH and isinstance(voice, dict) and _usable(voice.get("id")):
        return {**body, "voice": {**voice, "id": _pick(voice["id"], body, VOICES)}}
    return body


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    path = case.operation.path
    if path in (PAI_SPEECH, OPENAI_SPEECH):
        case.body = with_voice(case.body, path)
    elif path == ONE_VOICE and DOOMED and case.path_parameters and _usable(case.path_parameters.get("id")):
        case.path_parameters = {**case.path_parameters, "id": _pick(case.path_parameters["id"], (case.method, case.path_parameters), (DOOMED,))}
    return case
