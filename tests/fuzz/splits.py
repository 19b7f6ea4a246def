"""Ways to cut one byte string into the pieces a socket might deliver."""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterable


def cut(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at the given offsets (out-of-range and repeated offsets are ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def random_cut(data: bytes, seed: int) -> list[bytes]:
    """A reproducible random split: about one cut every 8 bytes."""
    rnd = random.Random(seed)
    return cut(data, rnd.sample(range(1, len(data)), min(len(data) - 1, len(data) // 8)) if len(data) > 1 else [])


def splits(data: bytes, seed: int) -> dict[str, list[bytes]]:
    """The splits every driver compares: whole, one byte at a time, and a seeded random one."""
    return {"whole": [data] if data else [], "bytewise": bytewise(data), "random": random_cut(data, seed)}
