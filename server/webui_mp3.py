"""`POST /webui/encode/mp3` (token): the WebUI's MP3 download, encoded from the PCM the page played.

The page always plays s16le PCM over the WebSocket; a second synthesis for the MP3 would be different
audio (sampling is random), so the page sends back the samples it received and this route encodes exactly
those with the server's own MP3 encoder. Query: `sample_rate` (one of the API's rates) and `bit_rate` (the
API's values, default 192k); body: raw s16le mono, at most `--max-body-bytes`.
"""
from __future__ import annotations

from urllib.parse import parse_qsl

import numpy as np

from protocol.encoders import Mp3Encoder
from protocol.errors import InvalidParameter
from protocol.schema import BIT_RATES_KBPS, SAMPLE_RATES
from server.context import Ctx

PATH = "/webui/encode/mp3"


def parse_query(query: str) -> tuple[int, int]:
    """(sample rate, bit rate kb/s) from the query, or InvalidParameter naming the field."""
    try:
        fields = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))  # "x=" is no absence
    except ValueError:
        raise InvalidParameter("malformed query string") from None
    rate = fields.get("sample_rate", "")
    if rate not in map(str, SAMPLE_RATES):  # compared as text: int() raised on "²" and 4300+ digits
        raise InvalidParameter(f"'sample_rate' must be one of {', '.join(map(str, SAMPLE_RATES))}; got {rate!r}")
    bit_rate = fields.get("bit_rate", "192k")
    if bit_rate not in BIT_RATES_KBPS:
        raise InvalidParameter(f"'bit_rate' must be one of {', '.join(BIT_RATES_KBPS)}; got {bit_rate!r}")
    return int(rate), BIT_RATES_KBPS[bit_rate]


def encode_pcm(pcm: bytes, sample_rate: int, kbps: int) -> bytes:
    encoder = Mp3Encoder(sample_rate, kbps)
    return encoder.feed(np.frombuffer(pcm, dtype="<i2")) + encoder.finish()


async def encode(ctx: Ctx) -> None:
    sample_rate, kbps = parse_query(ctx.req.query)
    pcm = ctx.req.body
    if not pcm:
        raise InvalidParameter("the body must hold the PCM to encode (s16le mono); it is empty")
    if len(pcm) % 2:
        raise InvalidParameter("PCM must be 16-bit samples: odd number of bytes")
    mp3 = await ctx.state.run_blocking(encode_pcm, pcm, sample_rate, kbps)
    await ctx.out.respond(200, [("content-type", "audio/mpeg")], mp3)
