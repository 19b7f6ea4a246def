"""Voice ids: the shape the stores give them (a UUID as `str(uuid.uuid4())` writes it), checked before any
store is asked.

An id arrives in a URL or a request body, and a store turns it into a file name (local) or an object key
(S3). Anything else is unknown at once (404): no path, key or query is ever built from what a client
typed ("../x", "/etc/passwd", NUL bytes, 5,000 characters, unicode...).
"""
from __future__ import annotations

import uuid

from protocol.errors import NotFound

_SHOWN_MAX = 64


def is_voice_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except (ValueError, TypeError, AttributeError):
        return False


def check_voice_id(voice_id: str) -> str:
    """`voice_id` when it has the shape of one, else NotFound (an error that repeats it only if harmless)."""
    if not is_voice_id(voice_id):
        raise not_found(voice_id)
    return voice_id


def not_found(voice_id: str) -> NotFound:
    harmless = len(voice_id) <= _SHOWN_MAX and voice_id.isprintable()
    return NotFound(f"reference audio not found: {voice_id if harmless else '(not a voice id)'}")
