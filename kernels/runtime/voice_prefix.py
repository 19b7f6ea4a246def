"""The streaming flow's work on a voice's prompt, done once per voice instead of once per request.

Every streaming request starts its flow on [prompt tokens ++ generated tokens], and the prompt is most of
the first chunk: a 3 s prompt is 75 tokens (150 mel frames) before the first hop's 25-49. In a non-final
streaming call everything is chunk-causal (kernels/runtime/flow_cache.py): the frames of the prompt's whole
encoder chunks that end before the look-ahead reaches a generated token depend only on the voice (its
tokens, prompt mel and speaker embedding) and the fixed CFM noise. So their caches (each layer's K/V and
conv tails, per Euler step) are the same for every request in that voice. We compute them in a call of
their own the first time a voice streams (or when the server stores it: `warm`), keep a copy, and start
later requests from a copy of it: the same computation (a call that starts on the chunk grid where its
cache ends is exact; the mel moves ~1e-6 only because the matmul shapes differ, as with the incremental
flow itself), minus the prefix. The first chunk on a 3 s prompt then computes 100 frames instead of 200.

The copies live in an LRU bounded by bytes (`budget_bytes`, 0 = off); the key is a digest of the voice's
arrays, so an edited or deleted voice never matches and simply ages out.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels.runtime.flow_cache import GROWTH, FlowStreamState, IncrementalFlow, KVBuffers, StreamCall

DEFAULT_BUDGET_BYTES = 1 << 30


MAX_ROOM = 4.0  # a restored stream's buffers at most this many times its prefix (a long first call grows them)


def voice_key(*arrays: np.ndarray | Tensor) -> bytes:
    """A digest of a voice's prompt arrays (tokens, mel, embedding): equal arrays, equal key."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        data = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
        h.update(str((data.dtype.str, data.shape)).encode())
        h.update(np.ascontiguousarray(data).tobytes())
    return h.digest()


def copy_state(state: FlowStreamState, room: float = 1.0) -> FlowStreamState:
    """A deep copy whose buffers have room for `room` times the cached frames (1.0: exactly them, as a
    stored prefix keeps them)."""
    out = FlowStreamState(tokens_done=state.tokens_done)
    for key, kv in state.kv.items():
        new = KVBuffers()
        for src, dst in ((kv.k, new.k), (kv.v, new.v)):
            if src.data is not None:
                dst.append(src.data[:, :, : src.length], min_capacity=math.ceil(src.length * room))
        out.kv[key] = new
    out.tails = {key: t.clone() for key, t in state.tails.items()}
    return out


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0  # prefixes computed (and stored when they fit)


class VoicePrefixCache:
    def __init__(self, flow: IncrementalFlow, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.flow = flow
        self.budget_bytes = budget_bytes
        self.chunk = flow.token_chunk
        self.lookahead = flow.flow.cfg.pre_lookahead_len
        self._entries: OrderedDict[bytes, FlowStreamState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = PrefixStats()

    def prefix_tokens(self, prompt_len: int) -> int:
        """Prompt tokens whose frames depend on the voice alone: whole chunks whose look-ahead stays in it."""
        return (max(0, prompt_len - self.lookahead) // self.chunk) * self.chunk

    @property
    def nbytes(self) -> int:
        return self._bytes

    def holds(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    @torch.inference_mode()
    def prepare(self, calls: list[tuple[bytes, StreamCall]]) -> None:
        """Bring each fresh call's state (nothing cached yet) to the end of its voice's prefix: from a stored
        copy, or by computing the prefix (one batched call for all voices missing) and storing a copy."""
        if self.budget_bytes <= 0:
            return
        missing: dict[bytes, list[StreamCall]] = {}
        for key, call in calls:
            prompt = int(call.prompt_feat.shape[0]) // self.flow.ratio
            if call.state.tokens_done or self.prefix_tokens(prompt) == 0:
                continue
            stored = self._get(key)
            if stored is not None:
                _restore(call.state, stored, self._room(call, stored.tokens_done))
            else:
                missing.setdefault(key, []).append(call)
        if not missing:
            return
        firsts = [group[0] for group in missing.values()]
        prefixes = []
        for call in firsts:
            end = self.prefix_tokens(int(call.prompt_feat.shape[0]) // self.flow.ratio) + self.lookahead
            prefixes.append(StreamCall(call.state, call.tokens[:end], call.prompt_feat, call.embedding))
        self.flow.forward(prefixes)
        for key, call in zip(missing, firsts):
            snapshot = copy_state(call.state)
            for other in missing[key]:  # (the same new voice twice in one batch: each its own copy)
                _restore(other.state, snapshot, self._room(other, snapshot.tokens_done))
            self._put(key, snapshot)

    def _room(self, call: StreamCall, prefix_tokens: int) -> float:
        """How much larger than the prefix a stream's buffers are made when it starts from one: what this
        call will have cached, with the usual growth slack. Copied at the prefix's exact size, every buffer
        (a K and a V per Euler step and attention layer) was grown -- copied again and its
        fresh pages faulted in again -- by the very call that restored it, and again by the next."""
        done_after = max(prefix_tokens, len(call.tokens) - self.lookahead)
        return min(MAX_ROOM, GROWTH * done_after / max(1, prefix_tokens))

    def warm(self, key: bytes, prompt_tokens: Tensor, prompt_feat: Tensor, embedding: Tensor) -> bool:
        """Compute and keep a voice's prefix before any stream needs it (needs only the prompt). True when
        the voice has a stored prefix afterwards."""
        if self.budget_bytes <= 0 or self.prefix_tokens(int(prompt_feat.shape[0]) // self.flow.ratio) == 0:
            return False
        if not self.holds(key):
            self.prepare([(key, StreamCall(FlowStreamState(), prompt_tokens, prompt_feat, embedding))])
        return self.holds(key)

    def _get(self, key: bytes) -> FlowStreamState | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return found

    def _put(self, key: bytes, snapshot: FlowStreamState) -> None:
        size = snapshot.nbytes
        with self._lock:
            self.stats.misses += 1
            if size > self.budget_bytes or key in self._entries:
                return
            while self._bytes + size > self.budget_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
            self._entries[key] = snapshot
            self._bytes += size


def _restore(state: FlowStreamState, snapshot: FlowStreamState, room: float) -> None:
    """Fill a fresh state with a copy of the snapshot (the request then appends to its own buffers)."""
    copied = copy_state(snapshot, room)
    state.tokens_done, state.kv, state.tails = copied.tokens_done, copied.kv, copied.tails
