"""Which streaming chunks run against a flow cache and which recompute: the flow-cache budget. Torch-free.

Like a block manager for the KV cache, but for the incremental flow (kernels/runtime/flow_cache.py): the runner
keeps, per request, the flow activations of the frames it has computed, so a non-final streaming chunk
only computes its new frames. That cache is exact only while it ends on the flow encoder's chunk grid
(`token_chunk` tokens, prompt included) and no later than the chunk's first kept token; it costs about
`bytes_per_frame` per mel frame (the runner's buffers grow by `growth`, so `need_bytes` includes that
slack). Here the scheduler decides, per chunk it plans (`ChunkItem.incremental`):

  * a chunk runs incrementally when it is a streaming chunk, the request's cache can continue into it
    (or the request has none yet: the first call encodes the prompt too), the request's cache up to the
    chunk's end fits the per-request budget, and all requests' reservations together fit the pool;
  * otherwise it recomputes, and the request's cache (if any) is dropped: a later chunk may start one;
  * after an incremental chunk the cache covers tokens [0, end) and stays reserved, unless it is the
    request's final chunk: then it is spent and its reservation freed. A chunk ending off the grid (a
    short first chunk, scheduler/chunk_policy.py `lead_hop`) leaves the cache at its last grid point:
    the next chunk recomputes the rest of that grid chunk (kernels/runtime/flow_cache.py).

An advance (`ChunkItem.advance`: flow work ahead of a chunk, see scheduler/chunk_policy.py) runs only
against a cache: `plan_advances` keeps those that fit and moves the request's cache end to the advance's
end, past the chunk's first kept token; the runner holds the frames in between for that chunk, so the
chunk continues from there (`_ahead`). A chunk that recomputes drops both.

Positions are flow tokens, prompt included: a chunk keeps the audio from token P + token_offset and its
frames end at P + token_end - lookahead (no look-ahead in a final chunk), P = `Request.flow_prompt_len`.
The budget tracks each request's cache end (`tokens_done`, as the runner's `FlowStreamState` does) and
its reservation, frees them on `release` (request ended, or the runner reported that it recomputed),
and reports `reserved_bytes`. The runner obeys `ChunkItem.incremental` and takes no memory decisions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from scheduler.plan import ChunkItem

DEFAULT_REQUEST_BYTES = 8 << 30  # per request; beyond it the request recomputes


def need_bytes(end: int, bytes_per_frame: int, mel_ratio: int = 2, growth: float = 1.5) -> int:
    """Cache bytes a request may hold once its frames up to token `end` are cached (with buffer slack)."""
    return int((growth * mel_ratio * end + 64) * bytes_per_frame)


def can_continue(done: int, start: int, end: int, token_chunk: int) -> bool:
    """Whether a cache covering tokens [0, done) (0: none) can run a call wanting the frames of tokens
    [start, end): it computes from `done`, so `done` must not lie after `start`, and on the grid."""
    return done <= start < end and done % token_chunk == 0


def keeps_state(end: int, token_chunk: int) -> bool:
    """After a call ending at `end`, the cache stays valid only on the chunk grid."""
    return end % token_chunk == 0


def grid_floor(end: int, token_chunk: int) -> int:
    """Where a cache ends after a non-final call ending at `end`: its last grid point."""
    return end // token_chunk * token_chunk


@dataclass(frozen=True)
class FlowBudgetConfig:
    """The model's numbers come from kernels (`kernels.runtime.flow_cache.flow_budget_config`); off by default."""

    enabled: bool = False  # False: every chunk recomputes
    bytes_per_frame: int = 0  # cache bytes per mel frame (model shapes x dtype), without buffer slack
    per_request_bytes: int = DEFAULT_REQUEST_BYTES
    pool_bytes: int | None = None  # all requests together; None = no shared limit, 0 = nothing fits
    token_chunk: int = 25  # flow encoder static_chunk_size: the grid a cache must end on
    mel_ratio: int = 2  # mel frames per token
    growth: float = 1.5  # buffer slack of the runner's caches (kernels/runtime/flow_cache.py GROWTH)
    lookahead: int = 3  # flow pre_lookahead_len: a non-final chunk's last tokens are look-ahead only

    def __post_init__(self) -> None:
        if self.bytes_per_frame < 0 or self.per_request_bytes < 0 or (self.pool_bytes or 0) < 0:
            raise ValueError("bytes_per_frame, per_request_bytes and pool_bytes must be >= 0")
        if self.token_chunk < 1 or self.mel_ratio < 1 or self.lookahead < 0 or self.growth < 1:
            raise ValueError("need token_chunk >= 1, mel_ratio >= 1, lookahead >= 0, growth >= 1")


class FlowCacheBudget:
    """Per-request flow-cache positions and reservations (see the module docstring). Not thread-safe:
    the scheduler owns it."""

    def __init__(self, config: FlowBudgetConfig) -> None:
        self.config = config
        self._done: dict[str, int] = {}  # request id -> its cache's end in tokens (prompt included)
        self._reserved: dict[str, int] = {}  # request id -> bytes its cache may hold
        self._ahead: set[str] = set()  # caches run past the next chunk's first kept token (an advance)
        self.reserved_bytes = 0  # their sum

    # ------------------------------------------------------------------ queries
    def need_bytes(self, end: int) -> int:
        cfg = self.config
        return need_bytes(end, cfg.bytes_per_frame, cfg.mel_ratio, cfg.growth)

    def tokens_done(self, request_id: str) -> int:
        """Where the request's cache ends (0: it has none)."""
        return self._done.get(request_id, 0)

    def reservation(self, request_id: str) -> int:
        return self._reserved.get(request_id, 0)

    @property
    def pool_bytes(self) -> int | None:
        return self.config.pool_bytes

    # ------------------------------------------------------------------ decisions
    def plan(self, items: Sequence[tuple[ChunkItem, int]]) -> list[ChunkItem]:
        """The chunks of one batch, as (chunk, flow prompt tokens P) in pick order, with `incremental` set.

        Chunks that cannot be incremental (not streaming, or the budget is off) free their request's cache
        first; then the streaming ones are decided in pick order, each against the reservations held at
        that point. An incremental chunk's reservation counts for the whole batch (its cache exists while
        the batch runs) and is freed afterwards when the cache ends off the grid or the chunk is final."""
        cfg = self.config
        out: list[ChunkItem | None] = [None] * len(items)
        for i, (chunk, _) in enumerate(items):
            if not (cfg.enabled and chunk.streaming):
                self.release(chunk.request_id)
                out[i] = replace(chunk, incremental=False) if chunk.incremental else chunk
        spent: list[str] = []
        for i, (chunk, prompt_len) in enumerate(items):
            if out[i] is not None:
                continue
            incremental = self._decide(chunk, prompt_len)
            if incremental and chunk.finalize:
                spent.append(chunk.request_id)
            out[i] = chunk if chunk.incremental == incremental else replace(chunk, incremental=incremental)
        for rid in spent:
            self.release(rid)
        return out  # type: ignore[return-value]

    def plan_advances(self, items: Sequence[tuple[ChunkItem, int]]) -> list[ChunkItem]:
        """The advances (as (advance, flow prompt tokens P)) whose request's cache can continue to their
        end within the budget; each of them now holds that cache (see the module docstring)."""
        cfg = self.config
        kept = []
        for chunk, prompt_len in items:
            rid = chunk.request_id
            end = prompt_len + chunk.token_end - cfg.lookahead
            done = self.tokens_done(rid)
            if not (cfg.enabled and chunk.streaming and can_continue(done, done, end, cfg.token_chunk)):
                continue
            if not self._fits(end, self.reservation(rid)):
                continue  # the cache stays as it is; the chunk itself decides later
            self._hold(rid, end)
            self._ahead.add(rid)
            kept.append(chunk)
        return kept

    def _decide(self, chunk: ChunkItem, prompt_len: int) -> bool:
        cfg = self.config
        rid = chunk.request_id
        first_kept = prompt_len + chunk.token_offset
        end = prompt_len + chunk.token_end - (0 if chunk.finalize else cfg.lookahead)
        done = self.tokens_done(rid)
        start = max(first_kept, done) if rid in self._ahead else first_kept  # frames before `done`: held
        self.release(rid)  # the cache either continues into this chunk (re-reserved below) or is dropped
        if not (can_continue(done, start, end, cfg.token_chunk) and self._fits(end, 0)):
            return False  # off the grid, or over the request's budget or the pool: recompute
        self._hold(rid, end, end if chunk.finalize else grid_floor(end, cfg.token_chunk))
        return True

    def _fits(self, end: int, held: int) -> bool:
        """Whether a cache up to `end` fits the per-request budget and, instead of `held`, the pool."""
        cfg, need = self.config, self.need_bytes(end)
        pool_ok = cfg.pool_bytes is None or self.reserved_bytes - held + need <= cfg.pool_bytes
        return need <= cfg.per_request_bytes and pool_ok

    def _hold(self, rid: str, end: int, done: int | None = None) -> None:
        """Reserve room for the frames up to `end` (the call computes them); the cache then ends at `done`."""
        need = self.need_bytes(end)
        self.reserved_bytes += need - self._reserved.get(rid, 0)
        self._done[rid] = end if done is None else done
        self._reserved[rid] = need

    def release(self, request_id: str) -> None:
        """Forget the request's cache and free its reservation (request ended, or the runner recomputed)."""
        self._done.pop(request_id, None)
        self._ahead.discard(request_id)
        self.reserved_bytes -= self._reserved.pop(request_id, 0)
