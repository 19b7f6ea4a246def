"""Chunk-causal attention of a stream's new queries over all its keys so far (cached ones first).

Query i (absolute frame start+i) sees keys up to the end of its own chunk; chunks are counted from frame 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chunk_hidden(start: int, n: int, chunk: int, device: torch.device) -> Tensor:
    """Bool `(n, start+n)`, True where new query i (absolute start+i) must NOT see key j (past its chunk)."""
    q = torch.arange(start, start + n, device=device)
    limit = (torch.div(q, chunk, rounding_mode="floor") + 1) * chunk
    return torch.arange(start + n, device=device).unsqueeze(0) >= limit.unsqueeze(1)


def chunk_causal_attention(q: Tensor, keys: Tensor, values: Tensor, start: int, chunk: int) -> Tensor:
    """Attention of new queries `(.., n, d)` (absolute frames start..start+n-1) over keys [0, start+n): one
    unmasked SDPA per chunk of queries over a key prefix (no mask tensor, and the masked blocks are never
    computed; 10-35 % faster than one masked call on CPU)."""
    n, end = q.size(2), keys.size(2)
    outs = []
    i = 0
    while i < n:
        stop = min(n, (((start + i) // chunk) + 1) * chunk - start)  # this chunk's last query + 1
        visible = min(end, start + stop)
        outs.append(F.scaled_dot_product_attention(q[:, :, i:stop], keys[:, :, :visible], values[:, :, :visible]))
        i = stop
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
