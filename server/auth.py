"""Bearer-token check, constant time against every configured token."""
from __future__ import annotations

import hmac
from collections.abc import Mapping


def token_ok(authorization: str | None, tokens: tuple[str, ...]) -> bool:
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    presented = value.strip().encode("utf-8")
    ok = False
    for token in tokens:  # no early exit: timing does not reveal which token matched
        ok |= hmac.compare_digest(presented, token.encode("utf-8"))
    return ok


def authorized(headers: Mapping[str, str], tokens: tuple[str, ...]) -> bool:
    return token_ok(headers.get("authorization"), tokens)
