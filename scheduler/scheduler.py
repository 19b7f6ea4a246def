"""Continuous-batching scheduler: decides every step, never touches a tensor.

Per step, `schedule()` builds a `StepPlan`: one decode for every running request that has an
input (bistream requests waiting for text are skipped), prefills for newly admitted requests
(and bistream extends) with the data of newly admitted requests, and the flow/vocoder chunks that
are ready, most urgent first, each marked incremental or recompute by the flow-cache budget
(scheduler/flow_budget.py); when none is ready and one stream is live, flow work ahead of its first
chunk instead (`ChunkItem.advance`, scheduler/chunk_policy.py). The runner executes it; `update(plan, result)` applies the sampled tokens (stop ids, min/max
length, fixed_tokens, bistream rules), frees KV slots as soon as the LLM of a request ends,
advances chunk progress and returns the ids of requests that ended in this step.
Not thread-safe: the engine thread owns it (cancel/push_text are relayed to that thread).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection

from protocol.errors import ErrorCode
from scheduler.bistream import FeederState, Outcome, runaway_cap
from scheduler.chunk_policy import ChunkPolicy
from scheduler.config import SchedulerConfig
from scheduler.flow_budget import FlowCacheBudget
from scheduler.kv_slots import KVSlotManager
from scheduler.plan import (
    SOS,
    TASK,
    ChunkItem,
    DecodeItem,
    NewRequest,
    PrefillItem,
    SampleSpec,
    Segment,
    StepPlan,
    StepResult,
    segments_length,
    speech_segment,
    text_segment,
)
from scheduler.request import Request, RequestStatus
from scheduler.stats import Counters, SchedulerStats, StepStats


class RequestRejected(ValueError):
    """add_request refused a request; `code` is the API error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.kv = KVSlotManager(config.num_slots, config.slot_len)
        self.chunks = ChunkPolicy(config.chunk)
        self.flow_cache = FlowCacheBudget(config.flow_cache)
        # requests with a planned chunk not yet back (update): an ended one keeps its flow-cache
        # reservation until then, since the runner's cache lives while the chunk runs
        self._chunks_out: set[str] = set()
        self._waiting: dict[str, Request] = {}  # insertion-ordered FIFO, O(1) cancel
        self._running: dict[str, Request] = {}  # holds a KV slot
        self._draining: dict[str, Request] = {}  # LLM done, chunks left
        self._ended: dict[str, Request] = {}  # ended since the last plan (reported as `released`)
        self._step = 0
        self._last = StepStats(kv_total_tokens=self.kv.total_tokens)
        self._counters = Counters()
        self._ended_now: list[str] = []

    # ------------------------------------------------------------------ intake
    def can_admit(self) -> bool:
        return len(self._waiting) < self.config.max_waiting

    def add_request(self, req: Request) -> None:
        """Queue a request (FIFO). Raises RequestRejected; clips max_len to the KV slot."""
        self._counters.submitted += 1
        if not self.can_admit():
            self._counters.rejected += 1
            raise RequestRejected(ErrorCode.OVERLOADED, "waiting queue is full")
        if self.get(req.request_id) is not None:
            raise RequestRejected(ErrorCode.INVALID_PARAMETER, f"duplicate request id {req.request_id}")
        self._fit_to_slot(req)
        if req.bistream:
            req.attach_feeder(self.config.eos_token, self.config.fill_token, self.config.mix_ratio)
        req.status = RequestStatus.WAITING
        self._waiting[req.request_id] = req

    def _fit_to_slot(self, req: Request) -> None:
        room = self.config.slot_len - (req.prompt_len if not req.bistream else self._bistream_prefix(req))
        if room < 1:
            self._counters.rejected += 1
            raise RequestRejected(ErrorCode.INVALID_PARAMETER, f"prompt does not fit a KV slot of {self.config.slot_len}")
        if req.bistream:
            return  # no min/max length in bistream; bounded by the slot and the runaway cap
        assert req.max_len is not None and req.min_len is not None
        req.max_len = min(req.max_len, room)
        req.min_len = min(req.min_len, req.max_len)
        if req.max_len < 1:
            self._counters.rejected += 1
            raise RequestRejected(ErrorCode.INVALID_PARAMETER, "no text to speak")

    @staticmethod
    def _bistream_prefix(req: Request) -> int:
        return 2 + len(req.prompt_text_ids) + len(req.prompt_speech_ids)

    def cancel(self, request_id: str) -> bool:
        """Stop a request now: slot freed, never scheduled or reported again. False if unknown/ended."""
        req = self._live(request_id)
        if req is None:
            return False
        self._end(req, RequestStatus.FINISHED_CANCELLED)
        return True

    def fail(self, request_id: str, reason: str) -> bool:
        """Fail one request (e.g. the runner raised for it); others are unaffected."""
        req = self._live(request_id)
        if req is None:
            return False
        req.fail_reason = reason
        self._end(req, RequestStatus.FINISHED_FAILED)
        return True

    def get(self, request_id: str) -> Request | None:
        """A live request, or one that ended since the last `schedule()`."""
        return self._live(request_id) or self._ended.get(request_id)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._draining)

    # ------------------------------------------------------------------ planning
    def schedule(self, with_chunks: bool = True, chunks_ahead: int = 2, in_flight: Collection[str] = ()) -> StepPlan:
        """The next step. with_chunks=False plans the LLM only: the engine does that while the previous
        chunk batch is still running on its stage thread (so no chunk is planned twice); requests that
        already hold the tokens of their next `chunks_ahead` chunks then pause (`far_ahead`), leaving the
        cores to the chunks and to requests that still need tokens for their next chunk, such as new ones
        on their way to a first packet. Requests with a chunk `in_flight` may always get two ahead (the
        one out and the next), so their audio does not gap when it is back."""
        released = tuple(self._ended)
        self._ended = {}
        self._step += 1
        if with_chunks:  # no chunk batch is out now (see above): free what ended requests still held
            self._chunks_back(list(self._chunks_out))
        prefills: list[PrefillItem] = []
        decodes: list[DecodeItem] = []
        admitted: list[NewRequest] = []
        for req in list(self._running.values()):
            ahead = 2 if req.request_id in in_flight else chunks_ahead
            if with_chunks or not self.chunks.far_ahead(req, ahead):
                self._plan_llm(req, prefills, decodes)
        self._admit(prefills, admitted)
        self._set_lead_hops(admitted)
        chunks = self._plan_chunks() if with_chunks else []
        self._last = self._step_stats(prefills, decodes, chunks)
        return StepPlan(self._step, tuple(prefills), tuple(decodes), tuple(chunks), released, tuple(admitted))

    def _plan_llm(self, req: Request, prefills: list[PrefillItem], decodes: list[DecodeItem]) -> None:
        assert req.slot is not None
        if req.feeder is None:
            spec = self._sample_spec(req, ignore_eos=len(req.sampled_ids) < (req.min_len or 0))
            decodes.append(DecodeItem(req.request_id, req.slot, req.num_computed, req.sampled_ids[-1], spec))
            return
        feed = req.feeder.pending_feed()
        if feed is None:
            return  # waiting for text: not scheduled this step
        if req.num_computed + segments_length(feed.segments) + 1 > self.config.slot_len:
            self._end_llm(req)  # the slot is full: stop here (documented truncation)
            return
        spec = self._sample_spec(req, feed.ignore_eos, feed.forced_token, feed.redraw_ids)
        single = feed.segments[0] if len(feed.segments) == 1 else None
        if single is not None and single.kind == "speech" and len(single.ids) == 1 and req.num_computed:
            decodes.append(DecodeItem(req.request_id, req.slot, req.num_computed, single.ids[0], spec))
        else:
            prefills.append(PrefillItem(req.request_id, req.slot, req.num_computed, feed.segments, spec))

    def _admit(self, prefills: list[PrefillItem], admitted: list[NewRequest]) -> None:
        budget = self.config.max_prefill_tokens_per_step - sum(p.num_tokens for p in prefills)
        for req in list(self._waiting.values()):
            if len(prefills) >= self.config.max_prefills_per_step or not self._has_room():
                return
            segments = self._first_segments(req)
            if segments is None:
                continue  # bistream without enough text yet: later requests may go first
            n = segments_length(segments)
            if prefills and n > budget:
                return  # FIFO: do not let a later, shorter prompt overtake
            slot = self.kv.allocate()
            assert slot is not None
            del self._waiting[req.request_id]
            req.slot, req.status = slot, RequestStatus.RUNNING
            self._running[req.request_id] = req
            self._counters.admitted += 1
            feed = req.feeder.pending_feed() if req.feeder else None
            spec = self._sample_spec(
                req,
                ignore_eos=feed.ignore_eos if feed else (req.min_len or 0) > 0,
                forced=feed.forced_token if feed else None,
                redraw=feed.redraw_ids if feed else (),
            )
            prefills.append(PrefillItem(req.request_id, slot, 0, segments, spec))
            admitted.append(NewRequest(req.request_id, req.voice, req.speed, req.seed))
            budget -= n

    def _set_lead_hops(self, admitted: list[NewRequest]) -> None:
        """Each request starting now gets its first chunk's hop for good (ChunkPolicy.lead_for)."""
        lead = self.chunks.lead_for(self.num_live)
        for item in admitted:
            req = self._running[item.request_id]
            req.lead_hop = lead if req.stream and not req.follows else 0  # a later piece's audio waits anyway

    def _has_room(self) -> bool:
        return self.kv.num_free > 0 and len(self._running) < self.config.max_running

    def _first_segments(self, req: Request) -> tuple[Segment, ...] | None:
        if req.feeder is not None:
            feed = req.feeder.pending_feed()
            return feed.segments if feed is not None else None
        segs = [SOS]
        if req.prompt_text_ids or req.text_ids:
            segs.append(text_segment(tuple(req.prompt_text_ids) + tuple(req.text_ids)))
        segs.append(TASK)
        if req.prompt_speech_ids:
            segs.append(speech_segment(req.prompt_speech_ids))
        return tuple(segs)

    def _sample_spec(self, req: Request, ignore_eos: bool, forced: int | None = None,
                     redraw: tuple[int, ...] = ()) -> SampleSpec:
        fixed = req.fixed_tokens is not None
        return SampleSpec(
            ignore_eos=ignore_eos or fixed,
            recent_ids=tuple(req.sampled_ids[-self.config.win_size:]),
            forced_token=forced,
            seed=req.seed,
            step=len(req.sampled_ids),
            ignore_all_stops=fixed,
            redraw_ids=redraw,
        )

    def _plan_chunks(self) -> list[ChunkItem]:
        ready = []
        for req in list(self._running.values()) + list(self._draining.values()):
            chunk = self.chunks.next_chunk(req)
            if chunk is not None:
                ready.append((req, chunk))
        picked = self.chunks.pick(ready, self.clock())
        if picked:
            prompt = {req.request_id: req.flow_prompt_len for req, _ in ready}
            planned = self.flow_cache.plan([(c, prompt[c.request_id]) for c in picked])
        else:
            planned = self._plan_advances()
        self._chunks_out.update(c.request_id for c in planned)
        return planned

    def _plan_advances(self) -> list[ChunkItem]:
        """With no chunk ready the flow would idle: flow work ahead of a lone stream's first chunk
        (scheduler/chunk_policy.py). Only for a lone one: with others, advances batched beside their
        decoding cost more throughput than they saved latency (measured in chunk_policy's docstring)."""
        if self.num_live != 1 or not self._running:
            return []  # (a lone draining stream has its final chunk ready: nothing ahead)
        req = next(iter(self._running.values()))
        item = self.chunks.next_advance(req, self.flow_cache.tokens_done(req.request_id))
        return [] if item is None else self.flow_cache.plan_advances([(item, req.flow_prompt_len)])

    def _step_stats(self, prefills: list[PrefillItem], decodes: list[DecodeItem], chunks: list[ChunkItem]) -> StepStats:
        return StepStats(
            step=self._step,
            prefills=len(prefills),
            prefill_tokens=sum(p.num_tokens for p in prefills),
            decode_batch=len(decodes),
            chunk_batch=len(chunks),
            waiting=len(self._waiting),
            running=len(self._running),
            draining=len(self._draining),
            kv_used_tokens=self.kv.used_tokens,
            kv_total_tokens=self.kv.total_tokens,
        )

    # ------------------------------------------------------------------ results
    def update(self, plan: StepPlan, result: StepResult) -> list[str]:
        """Apply the runner's result. Returns the ids of requests that ended since the previous
        update (also those ended by cancel()/fail()/a full slot): check `get(id).status`."""
        for rid, reason in result.failed.items():
            self.fail(rid, reason)
        for rid in result.flow_recomputed:
            self.flow_cache.release(rid)  # the runner had no cache for it: neither does the budget now
        for p in plan.prefills:
            self._counters.prefill_tokens += p.num_tokens
            self._apply_token(p.request_id, p.start_pos + p.num_tokens, result)
        for d in plan.decodes:
            self._counters.decode_tokens += 1
            self._apply_token(d.request_id, d.position + 1, result)
        for c in plan.chunks:
            self._apply_chunk(c, result)
        self._chunks_back([c.request_id for c in plan.chunks])
        self._counters.steps += 1
        ended, self._ended_now = self._ended_now, []
        return ended

    def _apply_token(self, rid: str, computed: int, result: StepResult) -> None:
        req = self._running.get(rid)
        if req is None:
            return  # ended during this step (failed, cancelled)
        token = result.sampled.get(rid)
        if token is None:
            self.fail(rid, "runner returned no token")
            return
        req.num_computed = computed
        assert req.slot is not None
        self.kv.set_used(req.slot, computed)
        if req.feeder is not None:
            self._apply_bistream_token(req, token)
        else:
            self._apply_unistream_token(req, token)

    def _apply_unistream_token(self, req: Request, token: int) -> None:
        if token in self.config.stop_token_ids:
            self._end_llm(req)  # the stop id is not kept
            return
        if not 0 <= token < self.config.eos_token:
            self.fail(req.request_id, f"runner sampled invalid token {token}")
            return
        req.sampled_ids.append(token)
        req.speech_ids.append(token)
        if len(req.speech_ids) >= (req.max_len or 0):
            self._end_llm(req)

    def _apply_bistream_token(self, req: Request, token: int) -> None:
        assert req.feeder is not None
        if not 0 <= token <= max(self.config.stop_token_ids):
            self.fail(req.request_id, f"runner sampled invalid token {token}")
            return
        outcome = req.feeder.on_sampled(token)
        if outcome is Outcome.ERROR:
            self.fail(req.request_id, f"bistream: unexpected token {token}")  # upstream raises too
            return
        if outcome is Outcome.END:
            self._end_llm(req)
            return
        req.sampled_ids.append(token)
        if outcome is Outcome.SPEECH:
            req.speech_ids.append(token)
            final = req.feeder.state is FeederState.FINAL
            if final and len(req.speech_ids) >= runaway_cap(req.num_text_tokens):
                self._end_llm(req)

    def _chunks_back(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._chunks_out.discard(rid)
            if self._live(rid) is None:
                self.flow_cache.release(rid)

    def _apply_chunk(self, chunk: ChunkItem, result: StepResult) -> None:
        req = self._live(chunk.request_id)
        if req is None:
            return
        if chunk.advance:
            self._counters.flow_advances += 1  # no audio; the runner holds its frames for the next chunk
            return
        samples = result.chunk_samples.get(chunk.request_id)
        if samples is None:
            self.fail(chunk.request_id, "runner returned no audio for a chunk")
            return
        if req.first_chunk_s is None:
            req.first_chunk_s = self.clock()
        if req.playback.start_s is None:
            req.playback.start_s = req.first_chunk_s
        lookahead = 0 if chunk.finalize else self.config.chunk.lookahead
        covered = chunk.token_end - lookahead - chunk.token_offset
        req.token_offset += covered
        req.mel_frames_vocoded += covered * self.config.token_mel_ratio
        req.samples_emitted += samples
        req.playback.samples += samples
        req.chunks_done += 1
        self._counters.chunks += 1
        self._counters.samples_emitted += samples
        if chunk.is_last:
            self._end(req, RequestStatus.FINISHED_STOPPED)

    # ------------------------------------------------------------------ transitions
    def _live(self, request_id: str) -> Request | None:
        return self._waiting.get(request_id) or self._running.get(request_id) or self._draining.get(request_id)

    def _release_slot(self, req: Request) -> None:
        if req.slot is not None:
            self.kv.free(req.slot)
            req.slot = None
        self._running.pop(req.request_id, None)

    def _end_llm(self, req: Request) -> None:
        """LLM finished: free the KV slot at once; audio chunks may remain."""
        self._release_slot(req)
        req.llm_done = True
        if not req.speech_ids:
            self._end(req, RequestStatus.FINISHED_STOPPED)  # nothing to vocode
            return
        req.status = RequestStatus.DRAINING
        self._draining[req.request_id] = req

    def _end(self, req: Request, status: RequestStatus) -> None:
        self._release_slot(req)
        if req.request_id not in self._chunks_out:
            self.flow_cache.release(req.request_id)  # else when its chunk is back
        self._waiting.pop(req.request_id, None)
        self._draining.pop(req.request_id, None)
        req.status = status
        self._ended[req.request_id] = req
        self._ended_now.append(req.request_id)
        if status is RequestStatus.FINISHED_STOPPED:
            self._counters.finished += 1
        elif status is RequestStatus.FINISHED_CANCELLED:
            self._counters.cancelled += 1
        else:
            self._counters.failed += 1

    # ------------------------------------------------------------------ stats
    def stats(self) -> SchedulerStats:
        return SchedulerStats(last_step=self._last, totals=self._counters.snapshot(),
                              flow_cache_bytes=self.flow_cache.reserved_bytes,
                              flow_cache_pool_bytes=self.flow_cache.pool_bytes or 0)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_live(self) -> int:
        """Requests decoding or with audio still to make (running + draining)."""
        return len(self._running) + len(self._draining)
