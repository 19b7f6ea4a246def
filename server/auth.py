"""Bearer-token check, constant time against every configured token.

A browser's WebSocket cannot set headers, so the upgrade also takes the token from the subprotocol offer:
the page offers `["cosyserve", "bearer.<base64url(token)>"]` and the server answers with `cosyserve` alone
(the token is never echoed). The Authorization header, when sent, decides on its own; a token in the query
string is never read (URLs end up in logs and histories).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping, Sequence

SUBPROTOCOL = "cosyserve"  # the name the server answers with
BEARER_SUBPROTOCOL_PREFIX = "bearer."
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def _matches(presented: str, tokens: tuple[str, ...]) -> bool:
    raw = presented.encode("utf-8")
    ok = False
    for token in tokens:  # no early exit: timing does not reveal which token matched
        ok |= hmac.compare_digest(raw, token.encode("utf-8"))
    return ok


def token_ok(authorization: str | None, tokens: tuple[str, ...]) -> bool:
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return _matches(value.strip(), tokens)


def authorized(headers: Mapping[str, str], tokens: tuple[str, ...]) -> bool:
    return token_ok(headers.get("authorization"), tokens)


def subprotocol_token(offered: Sequence[str]) -> str | None:
    """The token in a `bearer.<base64url>` entry of the offer (padding optional), or None."""
    for proto in offered:
        if proto.startswith(BEARER_SUBPROTOCOL_PREFIX):
            encoded = proto[len(BEARER_SUBPROTOCOL_PREFIX):]
            if not _BASE64URL.fullmatch(encoded):  # the decoder alone would skip stray characters
                return None
            bare = encoded.rstrip("=")
            try:
                return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4)).decode("utf-8")
            except (binascii.Error, ValueError):  # bad length / not UTF-8: no token
                return None
    return None


def ws_authorized(headers: Mapping[str, str], offered: Sequence[str], tokens: tuple[str, ...]) -> bool:
    """The upgrade's credentials: the Authorization header if present, else the subprotocol offer."""
    if "authorization" in headers:
        return authorized(headers, tokens)
    token = subprotocol_token(offered)
    return token is not None and _matches(token, tokens)
