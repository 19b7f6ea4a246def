"""The WebUI's page and files (server/webui/), served by our own HTTP layer: `GET /` and `GET /webui/<file>`.

No token for these: a browser navigation cannot send one, and the files hold no secret; every API call the
page makes carries the token. A request can only name a file of the table built from the folder's listing
(one level, known types): no path from a request ever reaches the filesystem, so `..` cannot escape.
"""
from __future__ import annotations

from functools import cache
from importlib import resources

from protocol.errors import NotFound
from server.context import Ctx
from server.paths import normalise

PREFIX = "/webui/"
INDEX = "index.html"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# Self only. ws:/wss: for the duplex socket (CSP 'self' does not cover ws: in every browser); blob: for
# playing a voice and the synthesised result; no inline script or style anywhere.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self' ws: wss:; media-src 'self' blob:; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-cache"),  # revalidate: an upgraded server serves its own page at once
]


def serves(path: str) -> bool:
    """The page's paths: routed before the token check."""
    return path == "/" or (path.startswith(PREFIX) and "/" not in path[len(PREFIX):])


@cache
def files() -> dict[str, tuple[str, bytes]]:
    """name -> (content type, bytes) of every servable file, read once."""
    folder = resources.files("server") / "webui"
    table = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            table[entry.name] = (CONTENT_TYPES[suffix], entry.read_bytes())
    return table


async def serve(ctx: Ctx) -> None:
    path = normalise(ctx.req.path)
    name = INDEX if path == "/" else path[len(PREFIX):]
    found = files().get(name)
    if found is None:
        raise NotFound(f"no WebUI file {name!r}")
    content_type, body = found
    await ctx.out.respond(200, [("content-type", content_type), *SECURITY_HEADERS], body)
