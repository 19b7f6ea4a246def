"""Scheduler limits and the model constants it needs (token ids, hop schedule; kernels fills those in
from the model directory: `kernels.runtime.engine.scheduler_config`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.chunk_policy import ChunkPolicyConfig
from scheduler.flow_budget import FlowBudgetConfig


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int = 32  # KV slots the runner preallocates
    slot_len: int = 2048  # positions per slot: prompt + generated speech (2048 = ~75 s of speech)
    max_running: int | None = None  # requests holding a slot and decoding (decode batch bound); None: num_slots
    max_waiting: int = 256  # queue bound; past it `can_admit()` is False (server answers 429/503)
    # Requests arriving together are prefilled together, so their chunk boundaries line up and their
    # flow/vocoder calls batch (4 would split a burst of 8 into two flow batches of 4). Each prefill
    # delays the step's running decodes, which `max_prefill_tokens_per_step` bounds.
    max_prefills_per_step: int = 16
    max_prefill_tokens_per_step: int = 2048  # one longer prefill still runs, alone
    eos_token: int = 6561
    fill_token: int = 6563
    stop_token_ids: tuple[int, ...] = (6561, 6562, 6563)
    mix_ratio: tuple[int, int] = (5, 15)  # bistream text : speech interleave
    win_size: int = 10  # repetition-aware sampling window handed to the runner
    token_mel_ratio: int = 2
    chunk: ChunkPolicyConfig = field(default_factory=ChunkPolicyConfig)
    # which streaming chunks run against a flow cache (off by default: every chunk recomputes)
    flow_cache: FlowBudgetConfig = field(default_factory=FlowBudgetConfig)

    def __post_init__(self) -> None:
        if self.max_running is None:
            object.__setattr__(self, "max_running", self.num_slots)
        if min(self.num_slots, self.max_running, self.max_prefills_per_step) < 1:
            raise ValueError("num_slots, max_running, max_prefills_per_step must be >= 1")
        if self.slot_len < 2 or self.max_waiting < 0 or self.max_prefill_tokens_per_step < 1:
            raise ValueError("need slot_len >= 2, max_waiting >= 0, max_prefill_tokens_per_step >= 1")
        if self.eos_token not in self.stop_token_ids:
            raise ValueError("eos_token must be one of stop_token_ids")
        flow = self.flow_cache
        if flow.enabled and (flow.lookahead, flow.mel_ratio) != (self.chunk.lookahead, self.token_mel_ratio):
            raise ValueError("flow_cache lookahead / mel_ratio must match chunk.lookahead / token_mel_ratio")

