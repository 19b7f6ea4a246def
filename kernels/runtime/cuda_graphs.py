"""CUDA-graph capture of the LLM decode step for fixed batch buckets.

A decode step of a 0.5B model at small batch is launch-bound on a GPU (~24 layers x a dozen
kernels); replaying a captured graph removes that overhead. Shapes must be static, so each
bucket size B gets its own graph over static input buffers (embeddings, slots, positions) and
attends over the whole slot (`span = kv.max_len`, masked by position). A step with b requests
pads to the next bucket: padding rows point at a scratch KV slot and position 0, so they never
touch a live request's cache. Batches above the largest bucket run eagerly.

If capture fails (old driver, an op that cannot be captured), the runner falls back to eager
decode and says so once in the log.
"""
from __future__ import annotations

import bisect
import logging

import torch
from torch import Tensor

from kernels.networks.kv_cache import KVCache

log = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, lm, kv: KVCache, scratch_slot: int, buckets: tuple[int, ...]) -> None:
        self.lm = lm
        self.kv = kv
        self.scratch_slot = scratch_slot
        self.buckets = sorted(b for b in buckets if b >= 1)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        hidden = lm.cfg.qwen.hidden_size
        dev = kv.device
        top = self.buckets[-1]
        self.embeds = torch.zeros(top, hidden, device=dev, dtype=kv.dtype)
        self.slots = torch.full((top,), scratch_slot, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.outputs: dict[int, Tensor] = {}
        self.pool = None
        self.enabled = True
        try:
            self._capture_all()
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            log.warning("CUDA-graph capture failed (%s); decode runs eagerly", exc)
            self.enabled = False
            self.graphs.clear()

    def _forward(self, b: int) -> Tensor:
        return self.lm.decode(self.embeds[:b], self.slots[:b], self.positions[:b], self.kv, span=self.kv.max_len)

    def _capture_all(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy inits and autotuning happen outside capture
                self._forward(self.buckets[-1])
        torch.cuda.current_stream().wait_stream(stream)
        for b in reversed(self.buckets):  # largest first so the memory pool fits the rest
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[b] = self._forward(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch buckets %s", self.buckets)

    def run(self, embeds: Tensor, slots: Tensor, positions: Tensor) -> Tensor | None:
        """Hidden [b, H] via graph replay, or None when b is above the largest bucket."""
        b = embeds.shape[0]
        if not self.enabled or b > self.buckets[-1]:
            return None
        bucket = self.buckets[bisect.bisect_left(self.buckets, b)]
        self.embeds[:b].copy_(embeds)
        self.slots[:b].copy_(slots, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slots[b:bucket].fill_(self.scratch_slot)
        self.positions[b:bucket].zero_()
        self.graphs[bucket].replay()
        return self.outputs[bucket][:b]
