"""`MultipartReader` fed in pieces: (fields, files) or a 400/413/415, never another exception."""
from __future__ import annotations

from protocol.errors import ApiError
from protocol.multipart import MultipartReader

LIMITS = {"max_file_bytes": 200, "max_field_bytes": 40, "max_parts": 4}
ERROR_STATUSES = (400, 413, 415)
DEFAULT_CONTENT_TYPE = "multipart/form-data; boundary=B0UNDARY"


def run_multipart(pieces: list[bytes], content_type: str | None, **limits: int) -> tuple:
    """("form", fields, files) or ("error", class, status, code): what must not depend on the cuts."""
    try:
        reader = MultipartReader(content_type, **{**LIMITS, **limits})
        for piece in pieces:
            reader.feed(piece)
        fields, files = reader.finish()
    except ApiError as err:
        assert err.status in ERROR_STATUSES, repr(err)
        return ("error", type(err).__name__, err.status, str(err.code))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()), fields
    return ("form", fields, {name: (f.filename, f.content_type, f.data) for name, f in files.items()})


def parse_input(data: bytes) -> tuple[str, bytes]:
    """A fuzz input: the Content-Type (latin-1, as HttpRequest decodes headers) up to the first newline,
    then the body; without a newline, all of it is the body of a fixed boundary."""
    head, sep, body = data.partition(b"\n")
    return (head.decode("latin-1"), body) if sep else (DEFAULT_CONTENT_TYPE, data)
