"""One HTTP request as a handler sees it: the shared state, the request, its id, where to answer."""
from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from server.state import ServerState


class Responder(Protocol):
    started: bool  # a response head went out (errors can no longer be a plain response)

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None: ...
    async def start_stream(self, status: int, headers: list[tuple[str, str]]) -> None: ...
    async def send_chunk(self, data: bytes) -> None: ...
    async def end_stream(self) -> None: ...


class Request(Protocol):
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Ctx:
    state: ServerState
    req: Request
    request_id: str
    out: Responder
    arrived_s: float  # loop.time() when the request was complete (metrics baseline)

    async def json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        await self.out.respond(status, [("content-type", "application/json")], body)


Handler = Callable[[Ctx], Awaitable[None]]


def new_request_id() -> str:
    return str(uuid.uuid4())
