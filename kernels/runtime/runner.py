"""The model runner: executes a scheduler `StepPlan` as batched forwards (it decides nothing).

One step = (1) every prefill of the plan packed into one LLM pass, (2) one decode position for
every running request in one batched pass (CUDA-graph replay on GPU), (3) one vectorised RAS
sampling call over all of them, (4) the flow for every ready chunk, batched by its
(streaming, finalize) flags, and (5) HiFT for all those chunks (equal lengths share a call).
Per-request tensors (flow prompt, speaker embedding, vocoder cache, RNGs, flow cache) live here,
keyed by request id, created from the plan's `admitted` entries; the scheduler owns everything else,
including which chunks run against a flow cache (`ChunkItem.incremental`, scheduler/flow_budget.py). `execute` runs a whole step on the caller's thread;
the overlapped engine calls its halves instead: `execute_llm` (1-3) on the engine thread and
`execute_chunks` (4-5) on the stage thread, at the same time for different requests.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels.networks.kv_cache import KVCache
from kernels.networks.sampling import ras_sample, recent_window
from kernels.runtime.cuda_graphs import DecodeGraphs
from kernels.runtime.device import intra_op_threads
from kernels.runtime.flow_cache import FlowStreamState, IncrementalFlow, StreamCall
from kernels.runtime.shards import ShardPool
from kernels.runtime.vocoder_stream import VocoderState, stretch_mel, vocode_chunks
from kernels.runtime.voice_prefix import DEFAULT_BUDGET_BYTES as VOICE_PREFIX_BYTES
from kernels.runtime.voice_prefix import VoicePrefixCache, voice_key
from kernels.weights.model import CosyVoice2Model
from scheduler.jobs import VoicePrompt
from scheduler.plan import ChunkItem, ChunkOutput, NewRequest, Segment, StepPlan, StepResult


@dataclass
class RequestTensors:
    """Runner-side state of one request."""

    prompt_tokens: Tensor  # [P] long, flow prompt speech tokens
    prompt_mel: Tensor  # [2P, 80]
    embedding: Tensor  # [192]
    speed: float
    vocoder: VocoderState
    sampler: torch.Generator | None  # per-request LLM sampling RNG (seeded requests)
    voice_key: bytes = b""  # digest of the voice's prompt arrays (kernels/runtime/voice_prefix.py)
    llm_time_s: float = 0.0  # LLM time accrued since this request's last chunk
    # mel [80, n] of the next chunk's first frames, computed ahead (`ChunkItem.advance`), from mel frame
    # `ahead_from` (prompt included) up to where the flow cache ends
    ahead: Tensor | None = None
    ahead_from: int = 0
    ahead_s: float = 0.0  # flow time of those advances, charged to that chunk


@dataclass
class StepTimings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    sample_s: float = 0.0
    flow_s: float = 0.0
    vocoder_s: float = 0.0
    decode_batch: int = 0
    flow_batch: int = 0
    vocoder_batch: int = 0


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF)
    return gen


class ModelRunner:
    def __init__(
        self,
        model: CosyVoice2Model,
        num_slots: int,
        slot_len: int,
        cuda_graphs: bool = True,
        graph_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
        incremental_flow: bool = False,  # False: incremental chunks recompute (reported in StepResult)
        stage_workers: int = 1,  # CPU: flow/vocoder shards of a batch run on this many single-threaded workers
        voice_prefix_bytes: int = VOICE_PREFIX_BYTES,  # streaming flow prefixes kept per voice (0 = off)
    ) -> None:
        self.model = model
        self.device = torch.device(model.device)
        qwen = model.config.llm.qwen
        dtype = next(model.llm.parameters()).dtype
        # one extra scratch slot: padding rows of a CUDA-graph bucket write there, never into a live slot
        self.kv = KVCache.for_model(qwen, num_slots + 1, slot_len, self.device, dtype)
        self.scratch_slot = num_slots
        self.requests: dict[str, RequestTensors] = {}
        self.llm_cfg = model.config.llm
        self.ratio = model.config.flow.token_mel_ratio
        self.lookahead = model.config.flow.pre_lookahead_len
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model.llm, self.kv, self.scratch_slot, graph_buckets)
        self.last_llm = StepTimings()
        self.last_chunks = StepTimings()
        # CUDA: a stage thread's flow/vocoder go on their own stream so they overlap the decode
        self.stage_stream: torch.cuda.Stream | None = None
        # Chunks the scheduler marks incremental compute only their new mel frames (kernels/runtime/flow_cache.py);
        # their mel equals the recompute path's to ~1e-6 (other matmul shapes). Which requests may keep a
        # cache, and how much memory that takes, is the scheduler's call (scheduler/flow_budget.py).
        self.flow_inc = IncrementalFlow(model.flow) if incremental_flow else None
        # A voice's prompt frames are computed once and copied into its later streams (voice_prefix.py).
        self.voice_prefix = VoicePrefixCache(self.flow_inc, voice_prefix_bytes) if self.flow_inc else None
        self.flow_states: dict[str, FlowStreamState] = {}
        # flow_states change on the stage thread (chunks) and the engine thread (release)
        self._flow_lock = threading.RLock()
        self.shards = ShardPool(stage_workers if self.device.type == "cpu" else 1)
        # CPU, stages overlapped (the engine sets it): a lone request's flow call while its LLM still decodes
        # runs on one worker thread, not with the stage thread's intra-op threads. Beside the decode's threads
        # those would oversubscribe the cores: a 100-frame first chunk took 1.36 s on 2 threads, 1.20 s on 1
        # (cpu-fast path; 2.53 vs 2.35 s on the default path), the decode steps alike.
        self.lone_flow_beside_llm = False
        # CPU, stages overlapped (the engine sets it): an LLM step while a chunk batch leaves some cores free
        # takes only those, not all its intra-op threads: on 2 cores beside a lone stream's flow worker, 1
        # thread decoded faster than 2 fighting the flow for a core (LLM steps 1.08-1.11x; C1 speech-s/s
        # 1.03-1.06x, TTFC p50 0.97-1.00x: bench/results/2026-12-07-cpu2-full-llm-yields{,-2}.md). Beside a
        # batch on every core it keeps its threads (yielding there too measured C8 0.98x).
        self.llm_yields_cores = False
        self._stage_cores = 0  # cores the running chunk batch occupies (0: none running)
        self._chunks_alone = False  # the running chunk batch has no LLM step beside it (execute_chunks)

    # ------------------------------------------------------------------ request state

    def _add_request(self, new: NewRequest) -> None:
        """A newly admitted request's state (from `StepPlan.admitted`, before its first prefill)."""
        voice, seed = new.voice, new.seed
        if voice is None:
            raise ValueError("the request has no voice prompt")
        tokens, mel, embedding = self._voice_tensors(voice)
        self.requests[new.request_id] = RequestTensors(
            prompt_tokens=tokens,
            prompt_mel=mel,
            embedding=embedding,
            speed=float(new.speed),
            # the vocoder noise RNG lives on the CPU: cheap, and identical on every device
            vocoder=VocoderState(generator=_generator(None if seed is None else seed + 1, torch.device("cpu"))),
            # sampling RNG on the host too: per step a CUDA batch then costs one copy, not B RNG launches
            sampler=_generator(seed, torch.device("cpu")),
            # only the voice prefix reads it: no digest of the prompt per request when it is off
            voice_key=voice_key(voice.speech_tokens, voice.mel, voice.embedding) if self.voice_prefix else b"",
        )

    def _voice_tensors(self, voice: VoicePrompt) -> tuple[Tensor, Tensor, Tensor]:
        """The flow's prompt inputs on the device: speech tokens (long), prompt mel and speaker embedding
        (in the flow's dtype)."""
        dev, dtype = self.device, next(self.model.flow.parameters()).dtype
        return (torch.as_tensor(np.asarray(voice.speech_tokens), dtype=torch.long, device=dev),
                torch.as_tensor(np.asarray(voice.mel), dtype=dtype, device=dev),
                torch.as_tensor(np.asarray(voice.embedding), dtype=dtype, device=dev))

    def warm_voice(self, voice: VoicePrompt) -> bool:
        """Compute the voice's streaming-flow prefix now (kernels/runtime/voice_prefix.py), so its first
        stream starts from it too. Runs on the caller's thread (the flow's weights are only read; the
        store has its own lock). False when there is nothing to keep (prefix off, a short prompt)."""
        if self.voice_prefix is None:
            return False
        return self.voice_prefix.warm(voice_key(voice.speech_tokens, voice.mel, voice.embedding),
                                      *self._voice_tensors(voice))

    def release(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        with self._flow_lock:
            self.flow_states.pop(request_id, None)

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[StepResult, list[ChunkOutput]]:
        """The whole step on the calling thread: LLM, then the plan's chunks. `plan.released` is the
        caller's to `release` (the engine defers it while a request's chunk is out)."""
        llm = self.execute_llm(plan)
        if not plan.chunks:
            return llm, []
        chunked, outputs = self.execute_chunks(plan.chunks)
        merged = StepResult(sampled=llm.sampled, chunk_samples=chunked.chunk_samples,
                            failed={**llm.failed, **chunked.failed}, flow_recomputed=chunked.flow_recomputed)
        return merged, outputs

    @torch.inference_mode()
    def execute_llm(self, plan: StepPlan) -> StepResult:
        """The plan's new requests' state, then prefills + one decode position for every running request +
        sampling (the plan's chunks are ignored). A new request whose state cannot be made fails alone."""
        with intra_op_threads(self._llm_threads()):
            return self._execute_llm(plan)

    def _llm_threads(self) -> int:
        """Intra-op threads for an LLM step now (0: the calling thread's own)."""
        busy = self._stage_cores
        if not (self.llm_yields_cores and busy):
            return 0
        left = torch.get_num_threads() - busy
        return left if left >= 1 else 0

    def _execute_llm(self, plan: StepPlan) -> StepResult:
        timings = StepTimings()
        sampled: dict[str, int] = {}
        failed: dict[str, str] = {}
        for new in plan.admitted:
            try:
                self._add_request(new)
            except (ValueError, TypeError, RuntimeError) as exc:  # a bad voice prompt: this request only
                failed[new.request_id] = f"could not prepare the request: {exc}"
        prefills = tuple(p for p in plan.prefills if p.request_id not in failed) if failed else plan.prefills
        hidden_parts: list[Tensor] = []
        items: list = []  # PrefillItem | DecodeItem, aligned with the hidden rows
        t0 = time.perf_counter()
        if prefills:
            hidden_parts.append(self._prefill(prefills))
            items.extend(prefills)
        t1 = time.perf_counter()
        if plan.decodes:
            hidden_parts.append(self._decode(plan.decodes))
            items.extend(plan.decodes)
            timings.decode_batch = len(plan.decodes)
        t2 = time.perf_counter()
        if items:
            sampled = self._sample(torch.cat(hidden_parts), items)
        t3 = time.perf_counter()
        timings.prefill_s, timings.decode_s, timings.sample_s = t1 - t0, t2 - t1, t3 - t2
        self._charge_llm_time(items, t3 - t0)
        self.last_llm = timings
        return StepResult(sampled=sampled, chunk_samples={}, failed=failed)

    @torch.inference_mode()
    def execute_chunks(self, chunks: tuple[ChunkItem, ...], alone: bool = False) -> tuple[StepResult, list[ChunkOutput]]:
        """Flow + vocoder for these chunks. May run on a stage thread while the engine thread runs
        `execute_llm`: it touches only the chunks' requests, whose state must not be released meanwhile.
        alone: no LLM step runs meanwhile, so a lone chunk runs on the calling thread with its intra-op
        threads (the engine thread's: every core) instead of a 1-thread worker beside the decode."""
        # a lone chunk runs on one worker (or the calling thread), a batch on up to every shard worker
        self._stage_cores = 1 if len(chunks) == 1 else min(len(chunks), self.shards.workers)
        self._chunks_alone = alone
        try:
            return self._execute_chunks(chunks)
        finally:
            self._stage_cores = 0
            self._chunks_alone = False

    def _execute_chunks(self, chunks: tuple[ChunkItem, ...]) -> tuple[StepResult, list[ChunkOutput]]:
        timings = StepTimings()
        failed: dict[str, str] = {}
        recomputed: set[str] = set()
        outputs: list[ChunkOutput] = []
        if self.stage_stream is not None:
            # request tensors were made on the default stream (execute_llm): order after that work
            self.stage_stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self.stage_stream) if self.stage_stream is not None else contextlib.nullcontext():
            outputs = self._chunks(chunks, timings, failed, recomputed)
        self.last_chunks = timings
        chunk_samples = {o.request_id: int(o.pcm.shape[0]) for o in outputs}
        return StepResult(sampled={}, chunk_samples=chunk_samples, failed=failed,
                          flow_recomputed=frozenset(recomputed)), outputs

    @property
    def last(self) -> StepTimings:
        """The latest LLM and chunk timings as one step (for stats)."""
        llm, ch = self.last_llm, self.last_chunks
        return StepTimings(llm.prefill_s, llm.decode_s, llm.sample_s, ch.flow_s, ch.vocoder_s,
                           llm.decode_batch, ch.flow_batch, ch.vocoder_batch)

    def _charge_llm_time(self, items: list, seconds: float) -> None:
        if not items:
            return
        share = seconds / len(items)
        for item in items:
            state = self.requests.get(item.request_id)
            if state is not None:
                state.llm_time_s += share

    # ------------------------------------------------------------------ LLM

    def _embed_segments(self, segments: tuple[Segment, ...]) -> Tensor:
        lm = self.model.llm
        parts = []
        for seg in segments:
            if seg.kind == "sos":
                parts.append(lm.sos_embed()[None])
            elif seg.kind == "task":
                parts.append(lm.task_embed()[None])
            elif seg.kind == "text":
                parts.append(lm.text_embed(seg.ids))
            else:
                parts.append(lm.speech_embed(seg.ids))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _prefill(self, prefills) -> Tensor:
        packed = [(self._embed_segments(p.segments), p.slot, p.start_pos) for p in prefills]
        return self.model.llm.prefill_batch(packed, self.kv)

    def _decode(self, decodes) -> Tensor:
        lm = self.model.llm
        tokens = torch.tensor([d.token_id for d in decodes], dtype=torch.long)
        slots = torch.tensor([d.slot for d in decodes], dtype=torch.long)
        positions = torch.tensor([d.position for d in decodes], dtype=torch.long)
        if self.graphs is not None:
            out = self.graphs.run(lm.speech_embed(tokens.to(self.device)), slots, positions)
            if out is not None:
                return out
        span = int(positions.max()) + 1
        return lm.decode(
            lm.speech_embed(tokens.to(self.device)), slots.to(self.device), positions.to(self.device), self.kv, span
        )

    def _sample(self, hidden: Tensor, items: list) -> dict[str, int]:
        cfg = self.llm_cfg
        dev = hidden.device
        logp = self.model.llm.logprobs(hidden)
        win = cfg.win_size
        recent = recent_window([item.sample.recent_ids for item in items], win)
        ignore_eos = torch.tensor([it.sample.ignore_eos for it in items], dtype=torch.bool)
        no_stops = [row for row, it in enumerate(items) if it.sample.ignore_all_stops]
        if no_stops:  # bench fixed length: no stop id may win
            logp[torch.tensor(no_stops, device=dev)[:, None], torch.tensor(cfg.stop_token_ids, device=dev)] = float("-inf")
        gens = [self._sampler(it.request_id) for it in items]
        redraw = None
        if any(it.sample.redraw_ids for it in items):
            redraw = torch.zeros(logp.shape, dtype=torch.bool)
            for row, it in enumerate(items):
                redraw[row, list(it.sample.redraw_ids)] = True
        tokens = ras_sample(
            logp, recent.to(dev), ignore_eos.to(dev), cfg.eos_token, cfg.top_p, cfg.top_k, cfg.tau_r, gens,
            redraw=redraw,
        ).tolist()
        out: dict[str, int] = {}
        for item, tok in zip(items, tokens):
            forced = item.sample.forced_token
            out[item.request_id] = int(forced if forced is not None else tok)
        return out

    def _sampler(self, request_id: str) -> torch.Generator | None:
        state = self.requests.get(request_id)
        return None if state is None else state.sampler

    # ------------------------------------------------------------------ flow + vocoder

    def _chunks(self, chunks: tuple[ChunkItem, ...], timings: StepTimings, failed: dict[str, str],
                recomputed: set[str]) -> list[ChunkOutput]:
        live = [c for c in chunks if c.request_id in self.requests]
        for c in chunks:
            if c.request_id not in self.requests:
                failed[c.request_id] = "runner has no state for this request"
        if self.flow_inc is None:  # no flow cache to advance: the scheduler's budget forgets the request's
            recomputed.update(c.request_id for c in live if c.advance)
            live = [c for c in live if not c.advance]
        groups: dict[tuple[bool, bool], list[ChunkItem]] = {}
        for c in live:
            groups.setdefault((c.streaming, c.finalize), []).append(c)
        mels: dict[str, Tensor] = {}
        t0 = time.perf_counter()
        for (streaming, finalize), group in groups.items():
            mels.update(self._flow_group(group, streaming, finalize))
        recomputed.update(c.request_id for c in live if c.incremental and not self._can_run_incremental(c))
        t1 = time.perf_counter()
        flowed = len(live)
        for c in live:
            if c.advance:
                self.requests[c.request_id].ahead_s += (t1 - t0) / flowed
        live = [c for c in live if not c.advance]  # advances: flow only, their frames wait in `ahead`
        vocoder_items = []
        for c in live:
            state = self.requests[c.request_id]
            mel = mels[c.request_id]
            if state.speed != 1.0:
                mel = stretch_mel(mel, state.speed)
            vocoder_items.append((state.vocoder, mel, c.is_last))
        hift = self.model.hift
        wavs = self.shards.map(lambda part: vocode_chunks(hift, part), vocoder_items,
                               [float(mel.shape[-1]) for _, mel, _ in vocoder_items])
        t2 = time.perf_counter()
        timings.flow_s, timings.vocoder_s = t1 - t0, t2 - t1
        timings.flow_batch, timings.vocoder_batch = flowed, len(live)
        share = (t2 - t0) / max(1, len(live))
        outputs = []
        for c, wav in zip(live, wavs):
            state = self.requests[c.request_id]
            covered = (c.token_end if c.finalize else c.token_end - self.lookahead) - c.token_offset
            detail = {"llm_s": state.llm_time_s, "flow_s": (t1 - t0) / len(live), "vocoder_s": (t2 - t1) / len(live)}
            outputs.append(
                ChunkOutput(
                    request_id=c.request_id,
                    pcm=wav.float().cpu().numpy(),
                    tokens=covered,
                    generate_time_s=state.llm_time_s + state.ahead_s + share,
                    flow_batch=len(groups[(c.streaming, c.finalize)]),
                    vocoder_batch=len(live),
                    detail=detail,
                )
            )
            state.llm_time_s = state.ahead_s = 0.0
        return outputs

    def _can_run_incremental(self, chunk: ChunkItem) -> bool:
        """Whether this runner can run a chunk against a flow cache. An incremental chunk it cannot run
        recomputes and is reported (`StepResult.flow_recomputed`), so the scheduler forgets the cache."""
        return self.flow_inc is not None and chunk.streaming

    def _flow_group(self, group: list[ChunkItem], streaming: bool, finalize: bool) -> dict[str, Tensor]:
        """Each chunk's NEW mel frames [80, n], as the scheduler marked it: against the request's flow cache
        (`incremental`, see `_can_run_incremental`) or recomputed (its cache, if any, dropped). A cache that
        cannot continue into its chunk (none: a new request, or lost) is started afresh: that computes the
        prefix too, exactly, and leaves the cache where the scheduler's budget expects it."""
        cached: list[tuple[ChunkItem, FlowStreamState]] = []
        rest: list[ChunkItem] = []
        look = 0 if finalize else self.lookahead
        with self._flow_lock:
            for c in group:
                state = self.flow_states.pop(c.request_id, None)
                st = self.requests[c.request_id]
                ahead, st.ahead = st.ahead, None
                if not (c.incremental and self._can_run_incremental(c)):
                    rest.append(c)
                    continue
                keep_from = st.prompt_mel.shape[0] + c.token_offset * self.ratio
                end = st.prompt_tokens.shape[0] + c.token_end - look
                # the first token this call must compute: past frames held from an advance, if they still
                # join the cache (else they are recomputed); an advance may end before keep_from (the
                # prompt's last chunk): then any cache before its end does
                start = keep_from // self.ratio
                if ahead is not None and state is not None and ahead_joins(ahead, st.ahead_from, keep_from,
                                                                           state.tokens_done * self.ratio):
                    start, st.ahead = state.tokens_done, ahead
                if state is None or not self.flow_inc.can_start(state, min(start, end - 1), end):
                    state, st.ahead = FlowStreamState(), None
                cached.append((c, state))
        return self._flow_mixed(cached, rest, streaming, finalize)

    def _flow_mixed(self, cached: list[tuple[ChunkItem, FlowStreamState]], rest: list[ChunkItem],
                    streaming: bool, finalize: bool) -> dict[str, Tensor]:
        """Incremental and recompute chunks in ONE shard map, so every worker has work even when the
        budget lets only some requests keep caches. Cost ~ frames computed x (keys + a per-frame constant)."""
        dev = self.device
        items: list[tuple[ChunkItem, StreamCall | None]] = []
        costs: list[float] = []
        for c, state in cached:
            st = self.requests[c.request_id]
            ids = torch.tensor(c.token_ids[: c.token_end], dtype=torch.long, device=dev)
            call = StreamCall(state, torch.cat([st.prompt_tokens, ids]), st.prompt_mel, st.embedding)
            new = call.tokens.numel() - state.tokens_done
            items.append((c, call))
            costs.append(float(new * (call.tokens.numel() + 100)))
        for c in rest:
            total = self.requests[c.request_id].prompt_tokens.shape[0] + c.token_end
            items.append((c, None))
            costs.append(float(total * (total + 100)))
        # on an exception the states stay dropped (popped by the caller); the batch's requests fail
        beside_llm = (self.lone_flow_beside_llm and not self._chunks_alone
                      and not any(c.is_last for c, _ in items))  # last: its LLM is done
        mels = self.shards.map(lambda part: self._flow_part(part, streaming, finalize), items, costs,
                               lone_inline=not beside_llm)
        with self._flow_lock:
            for c, state in cached:
                if not finalize and self.flow_inc.keeps_state(state.tokens_done):  # else it is spent
                    self.flow_states[c.request_id] = state
        return {c.request_id: mel for (c, _), mel in zip(items, mels)}

    def _flow_part(self, part: list[tuple[ChunkItem, StreamCall | None]], streaming: bool,
                   finalize: bool) -> list[Tensor]:
        """One shard: its incremental calls in one batch, its recompute chunks in another."""
        out: list[Tensor | None] = [None] * len(part)
        inc = [i for i, (_, call) in enumerate(part) if call is not None]
        rec = [i for i, (_, call) in enumerate(part) if call is None]
        if inc:
            calls = [part[i][1] for i in inc]
            if self.voice_prefix is not None:  # fresh streams start from their voice's prompt frames
                keys = [self.requests[part[i][0].request_id].voice_key for i in inc]
                self.voice_prefix.prepare(list(zip(keys, calls)))
            results = self.flow_inc.forward(calls, finalize)
            for i, (mel, first) in zip(inc, results):
                c = part[i][0]
                st = self.requests[c.request_id]
                keep_from = st.prompt_mel.shape[0] + c.token_offset * self.ratio
                if st.ahead is not None:  # the frames [ahead_from, first) were computed by an advance
                    mel, first, st.ahead = torch.cat([st.ahead, mel], dim=1), st.ahead_from, None
                kept = mel[:, max(0, keep_from - first):]
                if c.advance:
                    st.ahead, st.ahead_from = (kept, keep_from) if kept.shape[1] else (None, 0)
                out[i] = kept.float()
        if rec:
            for i, mel in zip(rec, self._flow_recompute_batch([part[i][0] for i in rec], streaming, finalize)):
                out[i] = mel
        return out  # type: ignore[return-value]

    def _flow_recompute_batch(self, group: list[ChunkItem], streaming: bool, finalize: bool) -> list[Tensor]:
        """One flow call over prompt + all tokens so far for these chunks; each chunk's NEW mel frames."""
        flow = self.model.flow
        dev = self.device
        states = [self.requests[c.request_id] for c in group]
        seqs = [
            torch.cat([st.prompt_tokens, torch.tensor(c.token_ids[: c.token_end], dtype=torch.long, device=dev)])
            for st, c in zip(states, group)
        ]
        lens = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
        tokens = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long, device=dev)
        for row, s in enumerate(seqs):
            tokens[row, : s.shape[0]] = s
        feat_lens = torch.tensor([st.prompt_mel.shape[0] for st in states], dtype=torch.long)
        feat = torch.zeros(len(seqs), max(1, int(feat_lens.max())), states[0].prompt_mel.shape[1],
                           dtype=states[0].prompt_mel.dtype, device=dev)
        for row, st in enumerate(states):
            feat[row, : st.prompt_mel.shape[0]] = st.prompt_mel
        emb = torch.stack([st.embedding for st in states])
        mel, mel_lens = flow.inference(tokens, lens.to(dev), feat, feat_lens.to(dev), emb, streaming, finalize)
        return [mel[row, :, c.token_offset * self.ratio : int(mel_lens[row])].float() for row, c in enumerate(group)]


def ahead_joins(ahead: Tensor, ahead_from: int, keep_from: int, cache_end: int) -> bool:
    """Whether frames held from an advance are exactly a chunk's first frames up to where its cache ends."""
    return ahead_from == keep_from and ahead_from + ahead.shape[1] == cache_end
