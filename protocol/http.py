"""HTTP/1.1 request/response framing on top of `h11.Connection(h11.SERVER)`. Pure: bytes in, bytes out.

Theory of operation. The server feeds every received byte with `receive_data` (b"" = EOF) and
calls `next_request()` until it returns `NeedData`:
- `HttpRequest`: a whole request, body included (bodies are small: JSON or one upload, capped by
  `max_body_bytes`). The server answers it with `send_response` or `start_stream` / `send_chunk` /
  `end_stream`, then calls `start_next_cycle()`; if that returns True it calls `next_request()`
  again at once (pipelined requests already sit in h11's buffer and are answered in order), else
  it closes the socket after writing.
- `Upgrade`: the request asked to switch protocols (WebSocket). h11 stops parsing; the request and
  the bytes after it (`trailing_data`) go to `protocol.websocket.WebSocketSession`. A server that
  does not want the switch answers with `send_response` and the connection goes on as HTTP.
- `NeedData`: read more, after writing `to_send` (a `100 Continue`) if non-empty. `paused`: the
  previous response is not finished yet; h11 keeps the bytes and parses them after the next cycle.
- `ConnectionClosed`: the peer closed.
Errors are raised as `ApiError` (413 body too large, 431 headers too large, 400 malformed); the
server answers them with `send_error`, which always closes the connection afterwards.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import h11

from protocol.errors import ApiError, BadRequest, HeadersTooLarge, PayloadTooLarge, http_error

DEFAULT_MAX_HEADER_COUNT = 100

HeadersIn = Mapping[str, str] | Iterable[tuple[str, str]]


@dataclass(frozen=True)
class HttpRequest:
    method: str  # "GET", "POST", ...
    path: str  # percent-encoded path, without the query
    query: str  # raw query string without '?', "" if none
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    header_list: list[tuple[str, str]] = field(repr=False)  # lower-case names, in order
    body: bytes = field(repr=False)
    keep_alive: bool = True
    http_version: str = "1.1"

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass(frozen=True)
class NeedData:
    to_send: bytes = b""  # write this first (100 Continue)
    paused: bool = False  # waiting for the current response to finish


@dataclass(frozen=True)
class ConnectionClosed:
    pass


@dataclass(frozen=True)
class Upgrade:
    request: HttpRequest
    trailing_data: bytes  # bytes received after the request (the first WebSocket frames)
    connection: HttpConnection = field(repr=False)  # to answer the upgrade (101 or a refusal)


HttpEvent = HttpRequest | NeedData | ConnectionClosed | Upgrade


def _header_pairs(headers: HeadersIn) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(k.lower(), v) for k, v in items]


class HttpConnection:
    def __init__(self, *, max_header_bytes: int, max_body_bytes: int,
                 max_header_count: int = DEFAULT_MAX_HEADER_COUNT) -> None:
        """The size limits have no default here: they are the server's settings (`--max-header-bytes`,
        `--max-body-bytes`, server/config.py), passed down, so each has one default, in one place."""
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._max_body_bytes = max_body_bytes
        self._max_header_count = max_header_count
        self._request: h11.Request | None = None
        self._head = False
        self._body = bytearray()
        self._eof = False
        self._failed = False  # a request error was raised: the connection must close
        # The id of the request being answered: every response to it carries it as X-Request-Id.
        self.request_id: str | None = None

    # ---- input ----
    def receive_data(self, data: bytes) -> None:
        """Bytes from the socket; b"" means the peer closed its side."""
        if not data:
            self._eof = True
        try:
            self._h11.receive_data(data)
        except RuntimeError:  # data after EOF: ignore, the connection is going away
            pass

    def next_request(self) -> HttpEvent:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self._eof and self._h11.their_state is not h11.IDLE:
                    return ConnectionClosed()  # the peer hung up mid-request
                raise self._fail(_protocol_error(exc)) from None
            result = self._on_event(event)
            if result is not None:
                return result

    def _on_event(self, event: object) -> HttpEvent | None:
        if event is h11.NEED_DATA:
            return NeedData(to_send=self._maybe_continue())
        if event is h11.PAUSED:
            return NeedData(paused=True)  # a response (or a protocol switch) is pending
        if isinstance(event, h11.Request):
            self._start_request(event)
            return None
        if isinstance(event, h11.Data):
            self._add_body(event.data)
            return None
        if isinstance(event, h11.EndOfMessage):
            return self._finish_request()
        if isinstance(event, h11.ConnectionClosed):
            return ConnectionClosed()
        return None

    def _start_request(self, event: h11.Request) -> None:
        self._request = event
        self._head = event.method == b"HEAD"  # its response has the GET's head and no body (RFC 9110 9.3.2)
        self._body = bytearray()
        if len(event.headers) > self._max_header_count:
            raise self._fail(HeadersTooLarge(f"too many header fields (at most {self._max_header_count})"))
        length = _content_length(event)
        if length is not None and length > self._max_body_bytes:
            raise self._fail(PayloadTooLarge(
                f"request body of {length} bytes exceeds the limit of {self._max_body_bytes} bytes"))

    def _add_body(self, data: bytes) -> None:
        self._body += data
        if len(self._body) > self._max_body_bytes:
            raise self._fail(PayloadTooLarge(
                f"request body exceeds the limit of {self._max_body_bytes} bytes"))

    def _finish_request(self) -> HttpRequest | Upgrade:
        assert self._request is not None
        request = _build_request(self._request, bytes(self._body), self._keep_alive())
        self._body = bytearray()
        if self._h11.their_state is h11.MIGHT_SWITCH_PROTOCOL:
            data, _closed = self._h11.trailing_data
            return Upgrade(request, data, self)
        return request

    def _maybe_continue(self) -> bytes:
        if self._h11.they_are_waiting_for_100_continue and self._h11.our_state is h11.SEND_RESPONSE:
            return self._h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
        return b""

    def _keep_alive(self) -> bool:
        return (not self._failed and self._request is not None
                and self._request.http_version == b"1.1"
                and b"close" not in _connection_tokens(self._request.headers))

    def _fail(self, err: ApiError) -> ApiError:
        self._failed = True
        return err

    # ---- output ----
    def _close_header(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        request_done = self._h11.their_state in (h11.DONE, h11.MIGHT_SWITCH_PROTOCOL)
        must_close = self._failed or self._eof or not request_done or not self._keep_alive()
        if must_close and not any(k == "connection" for k, _ in headers):
            headers.append(("connection", "close"))
        return self._id_header(headers)

    def _id_header(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if self.request_id is not None and not any(k == "x-request-id" for k, _ in headers):
            headers.append(("x-request-id", self.request_id))
        return headers

    def _send(self, event: h11.Event) -> bytes:
        return self._h11.send(event) or b""

    def send_response(self, status: int, headers: HeadersIn, body: bytes) -> bytes:
        """A whole response; Content-Length is set here."""
        pairs = [(k, v) for k, v in _header_pairs(headers) if k not in ("content-length", "transfer-encoding")]
        pairs.append(("content-length", str(len(body))))
        out = self._send(h11.Response(status_code=status, headers=self._close_header(pairs)))
        if body and not self._head:
            out += self._send(h11.Data(data=body))
        return out + self._send(h11.EndOfMessage())

    def send_error(self, err: ApiError, request_id: str) -> bytes:
        """The JSON error response for `err`; the connection closes after it unless the request was
        read completely and is fine to follow (a 404 or 400 on a whole, well-framed request)."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return b""  # a response already started: nothing sane can be sent
        self.request_id = request_id
        return self.send_response(*http_error(err, request_id))

    def start_stream(self, status: int, headers: HeadersIn) -> bytes:
        """Response head without Content-Length: chunked for HTTP/1.1 (close-delimited for 1.0)."""
        pairs = [(k, v) for k, v in _header_pairs(headers) if k not in ("content-length", "transfer-encoding")]
        return self._send(h11.Response(status_code=status, headers=self._close_header(pairs)))

    def send_chunk(self, data: bytes) -> bytes:
        return self._send(h11.Data(data=data)) if data and not self._head else b""  # HEAD: the head only

    def end_stream(self) -> bytes:
        return self._send(h11.EndOfMessage())

    def accept_switch(self, headers: HeadersIn) -> bytes:
        """`101 Switching Protocols`; afterwards h11 is done with this connection."""
        return self._send(h11.InformationalResponse(status_code=101, headers=self._id_header(_header_pairs(headers))))

    # ---- cycle ----
    @property
    def reading_body(self) -> bool:
        """A request's head has been parsed and its body is still arriving (the server's body deadline)."""
        return self._request is not None and self._h11.their_state is h11.SEND_BODY

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not parsed yet: a partial or pipelined request (h11 has no public size)."""
        return len(self._h11._receive_buffer)

    @property
    def must_close(self) -> bool:
        return self._failed or self._h11.our_state in (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR) or \
            self._h11.their_state in (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)

    def start_next_cycle(self) -> bool:
        """After a response ends: True if the connection goes on (call `next_request` again)."""
        if self.must_close:
            return False
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._request, self._head = None, False  # an error before the next request parses has a body
            self.request_id = None
            return True
        return False

    def send_close(self) -> bytes:
        """Nothing to write for HTTP/1.1, but keeps h11's state honest before the socket closes."""
        try:
            return self._send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            return b""


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)  # h11 already validated it
    return None


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def _build_request(event: h11.Request, body: bytes, keep_alive: bool) -> HttpRequest:
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    header_list = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
    headers: dict[str, str] = {}
    for name, value in header_list:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return HttpRequest(method=event.method.decode("ascii"), path=path, query=query, headers=headers,
                       header_list=header_list, body=body, keep_alive=keep_alive,
                       http_version=event.http_version.decode("ascii"))


def _protocol_error(exc: h11.RemoteProtocolError) -> ApiError:
    status = exc.error_status_hint
    if status == 431:
        return HeadersTooLarge("request headers too large")
    return BadRequest(f"malformed HTTP request: {_reason(exc)}", status=status if 400 <= status < 500 else 400)


def _reason(exc: h11.RemoteProtocolError) -> str:
    """h11's reason without the bytes it quotes ("illegal header line: bytearray(b'Authorization: ...')"):
    an error never repeats the request's content, a token in a malformed header line included."""
    return re.split(r":|\{|\s(?:b'|b\"|bytearray\()", str(exc), maxsplit=1)[0].strip() or "bad framing"
