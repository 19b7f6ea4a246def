"""multipart/form-data bodies -> (text fields, files), with python-multipart's streaming parser.

The server's bodies are already whole (the HTTP layer caps them): `parse_multipart`. `MultipartReader`
takes the same body in pieces, with the same answer however it is cut. The streaming parser keeps memory
flat and is strict about framing: a body without its closing boundary is refused (400).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from protocol.errors import InvalidParameter, PayloadTooLarge, UnsupportedMediaType

DEFAULT_MAX_FIELD_BYTES = 64 * 1024  # a transcript; 30 s of speech is a few hundred characters
DEFAULT_MAX_PARTS = 16


@dataclass(frozen=True)
class UploadedFile:
    field_name: str
    filename: str  # as sent by the client ("" if none)
    content_type: str | None
    data: bytes = field(repr=False)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # header parameters from old clients


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)  # raw values (UTF-8 filenames)
    data: bytearray = field(default_factory=bytearray)
    is_file: bool = False


class _Collector:
    """python-multipart callbacks -> whole parts, with size limits."""

    def __init__(self, max_file_bytes: int, max_field_bytes: int, max_parts: int) -> None:
        self.limits = (max_file_bytes, max_field_bytes, max_parts)
        self.parts: list[_Part] = []
        self.ended = False
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
            "on_header_field": self.on_header_field, "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end, "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        if len(self.parts) >= self.limits[2]:
            raise InvalidParameter(f"too many form parts (at most {self.limits[2]})")
        self.parts.append(_Part())

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self.parts[-1].headers[self._field.decode("latin-1").lower()] = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def on_headers_finished(self) -> None:
        part = self.parts[-1]
        part.is_file = b"filename" in parse_options_header(part.headers.get("content-disposition", b""))[1]

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.data += data[start:end]
        limit = self.limits[0] if part.is_file else self.limits[1]
        if len(part.data) > limit:
            raise PayloadTooLarge(f"form {'file' if part.is_file else 'field'} larger than {limit} bytes")

    def on_end(self) -> None:
        self.ended = True


def _boundary(content_type: str | None) -> bytes:
    media, options = parse_options_header(content_type or "")
    if media != b"multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type must be multipart/form-data, got {content_type or 'none'}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidParameter("multipart/form-data without a boundary")
    return boundary


class MultipartReader:
    """One multipart/form-data body fed in pieces; refusals are `ApiError`s (400, 413, 415)."""

    def __init__(self, content_type: str | None, max_file_bytes: int,
                 max_field_bytes: int = DEFAULT_MAX_FIELD_BYTES, max_parts: int = DEFAULT_MAX_PARTS) -> None:
        self._collector = _Collector(max_file_bytes, max_field_bytes, max_parts)
        boundary = _boundary(content_type)
        try:
            self._parser = MultipartParser(boundary, self._collector.callbacks())  # type: ignore[arg-type]
        except FormParserError as exc:  # a boundary past python-multipart's 256 bytes (RFC 2046: 70)
            raise InvalidParameter(f"bad multipart boundary: {exc}") from None

    def feed(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise InvalidParameter(f"malformed multipart body: {exc}") from None

    def finish(self) -> tuple[dict[str, str], dict[str, UploadedFile]]:
        """Returns (text fields, files) by form name; a repeated name keeps the first."""
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise InvalidParameter(f"malformed multipart body: {exc}") from None
        if not self._collector.ended:
            raise InvalidParameter("malformed multipart body: truncated (no closing boundary)")
        return _split(self._collector.parts)


def parse_multipart(body: bytes, content_type: str | None, max_file_bytes: int,
                    max_field_bytes: int = DEFAULT_MAX_FIELD_BYTES,
                    max_parts: int = DEFAULT_MAX_PARTS) -> tuple[dict[str, str], dict[str, UploadedFile]]:
    """Returns (text fields, files) by form name; a repeated name keeps the first."""
    reader = MultipartReader(content_type, max_file_bytes, max_field_bytes, max_parts)
    reader.feed(body)
    return reader.finish()


def _split(parts: list[_Part]) -> tuple[dict[str, str], dict[str, UploadedFile]]:
    fields: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    for part in parts:
        disposition, options = parse_options_header(part.headers.get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise InvalidParameter("multipart part without Content-Disposition: form-data; name=...")
        name = _text(options[b"name"])
        if b"filename" in options:
            ctype = part.headers.get("content-type")
            files.setdefault(name, UploadedFile(name, _text(options[b"filename"]),
                                                ctype.decode("latin-1") if ctype else None, bytes(part.data)))
        elif name not in fields:
            try:
                fields[name] = bytes(part.data).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidParameter(f"form field {name!r} is not valid UTF-8") from None
    return fields, files
