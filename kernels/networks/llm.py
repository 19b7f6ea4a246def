"""CosyVoice2 `Qwen2LM`: speech-token language model around the Qwen2 backbone (§2.2, §4.1, §5).

Module names reproduce `llm.pt` exactly (`llm.model.model.*` is HF's Qwen2ForCausalLM.model
inside upstream's Qwen2Encoder); the tied `llm.model.lm_head.weight` is never allocated.

Execution API, all on a slot KV cache (`kernels.networks.kv_cache.KVCache`):
- `prefill(embeds[T,H], slot, start_pos, kv) -> [H]`: appends T positions to a slot
  (start_pos > 0 continues a running sequence, e.g. bistream text arriving mid-stream);
- `prefill_batch([(embeds, slot, start_pos), ...]) -> [N,H]`: several requests, one pass;
- `decode(embeds[B,H], slots[B], positions[B], kv) -> [B,H]`: one token for B requests at
  different lengths in one batched forward (length mask per row; no host sync, static shapes);
- `logprobs(hidden[B,H]) -> [B,6564]`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from kernels.config import LLMConfig, read_model_config
from kernels.networks.attention import (
    decode_attention,
    flash_decode_attention,
    prefill_attention,
    rowwise_decode_attention,
    use_flash,
)
from kernels.networks.kv_cache import KVCache
from kernels.networks.qwen2 import Qwen2Model
from kernels.networks.sampling import push_recent, ras_sample

SOS_INDEX, TASK_ID_INDEX = 0, 1  # rows of llm_embedding
TIED_LM_HEAD_KEY = "llm.model.lm_head.weight"

PrefillItem = tuple[torch.Tensor, int, int]  # (embeds [T,H], slot, start_pos)


def _ids(x: torch.Tensor | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    if x is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.as_tensor(x, device=device).reshape(-1).long()


class Qwen2LM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden, n_out = cfg.qwen.hidden_size, cfg.num_speech_outputs
        self.llm_embedding = nn.Embedding(2, cfg.llm_input_size)
        self.llm = nn.ModuleDict({"model": nn.ModuleDict({"model": Qwen2Model(cfg.qwen)})})
        self.llm_decoder = nn.Linear(hidden, n_out)
        self.speech_embedding = nn.Embedding(n_out, cfg.llm_input_size)
        self.attn_backend = "auto"  # "auto" | "sdpa" | "flash" (flash: CUDA, importable, fp16/bf16 only)
        # CPU decode attends per row on cache views once keys are long (see decode); below this
        # span one masked batched SDPA over a gathered copy is cheaper (fewer calls, small copy)
        self.cpu_rowwise_decode = True
        self.cpu_rowwise_min_span = 512

    @property
    def backbone(self) -> Qwen2Model:
        return self.llm["model"]["model"]  # type: ignore[return-value]

    # ------------------------------------------------------------------ input embeddings

    def text_embed(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.backbone.embed_tokens(_ids(ids, self.speech_embedding.weight.device))

    def speech_embed(self, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.speech_embedding(_ids(tokens, self.speech_embedding.weight.device))

    def sos_embed(self) -> torch.Tensor:
        return self.llm_embedding.weight[SOS_INDEX]

    def task_embed(self) -> torch.Tensor:
        return self.llm_embedding.weight[TASK_ID_INDEX]

    def build_lm_input(
        self,
        text_ids: torch.Tensor | Sequence[int],
        prompt_text_ids: torch.Tensor | Sequence[int] | None = None,
        prompt_speech_tokens: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """[sos, embed_tokens(prompt_text ++ text), task_id, speech_embedding(prompt speech)] -> [L, H]."""
        device = self.speech_embedding.weight.device
        text = torch.cat([_ids(prompt_text_ids, device), _ids(text_ids, device)])
        return torch.cat(
            [
                self.sos_embed()[None],
                self.text_embed(text),
                self.task_embed()[None],
                self.speech_embed(_ids(prompt_speech_tokens, device)),
            ]
        )

    # ------------------------------------------------------------------ forward passes

    def _prefill_packed(self, items: Sequence[PrefillItem], kv: KVCache) -> torch.Tensor:
        """All final-norm hidden states [sum T, H] of several (embeds, slot, start_pos)."""
        if not items:
            raise ValueError("prefill of nothing")
        lengths = [int(e.shape[0]) for e, _, _ in items]
        if min(lengths) <= 0:
            raise ValueError("prefill needs at least one position per item")
        for (_, slot, start), t in zip(items, lengths):
            if not 0 <= slot < kv.num_slots:
                raise ValueError(f"slot {slot} outside [0, {kv.num_slots})")
            if start < 0 or start + t > kv.max_len:
                raise ValueError(f"positions [{start}, {start + t}) exceed KV capacity {kv.max_len}")
        device = items[0][0].device
        embeds = torch.cat([e for e, _, _ in items]) if len(items) > 1 else items[0][0]
        positions = torch.cat([torch.arange(s, s + t, device=device) for (_, _, s), t in zip(items, lengths)])

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outs = []
            for (_, slot, start), qi, ki, vi in zip(
                items, q.split(lengths), k.split(lengths), v.split(lengths)
            ):
                kv.write_prefill(layer, slot, start, ki.transpose(0, 1), vi.transpose(0, 1))
                kc, vc = kv.slot_view(layer, slot, start + qi.shape[0])
                outs.append(prefill_attention(qi, kc, vc, start))
            return torch.cat(outs) if len(outs) > 1 else outs[0]

        return self.backbone(embeds.to(kv.dtype), positions, attend)

    def prefill_hidden(self, embeds: torch.Tensor, slot: int, start_pos: int, kv: KVCache) -> torch.Tensor:
        """Like `prefill` but returns the hidden state of every position, [T, H]."""
        return self._prefill_packed([(embeds, slot, start_pos)], kv)

    def prefill(self, embeds: torch.Tensor, slot: int, start_pos: int, kv: KVCache) -> torch.Tensor:
        """Write K/V of positions [start_pos, start_pos+T) of `slot`; hidden of the last one, [H]."""
        return self.prefill_hidden(embeds, slot, start_pos, kv)[-1]

    def prefill_batch(self, items: Sequence[PrefillItem], kv: KVCache) -> torch.Tensor:
        """Several requests' prefills in one pass (packed tokens); last hidden of each, [N, H]."""
        hidden = self._prefill_packed(items, kv)
        ends = torch.tensor([int(e.shape[0]) for e, _, _ in items]).cumsum(0) - 1
        return hidden.index_select(0, ends.to(hidden.device))

    def decode(
        self,
        embeds: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        span: int | None = None,
    ) -> torch.Tensor:
        """One step for B requests: row b's token sits at positions[b] of slots[b] and attends
        to [0, positions[b]]. `span` (a Python int >= max(positions)+1, default kv.max_len)
        bounds the keys read; keeping it fixed keeps shapes static for CUDA-graph capture.

        On CPU (no graphs, host reads are free) and spans of `cpu_rowwise_min_span` or more,
        attention runs per row on the cache views instead (`cpu_rowwise_decode`): no gather
        copy, no mask, only [0, pos] read. Accelerators always take the static masked path."""
        span = kv.max_len if span is None else span
        if self.cpu_rowwise_decode and embeds.device.type == "cpu" and span >= self.cpu_rowwise_min_span:
            return self._decode_rowwise(embeds, slots, positions, kv)
        valid = torch.arange(span, device=positions.device)[None, :] <= positions[:, None]
        flash = use_flash(embeds.device, self.attn_backend, embeds.dtype)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if flash:
                return flash_decode_attention(q, kv.k[layer], kv.v[layer], k, v, slots, positions)
            kv.write_decode(layer, slots, positions, k, v)
            kc, vc = kv.gather(layer, slots, span)
            return decode_attention(q, kc, vc, valid)

        return self.backbone(embeds.to(kv.dtype), positions, attend)

    def _decode_rowwise(
        self, embeds: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, kv: KVCache
    ) -> torch.Tensor:
        host_slots, host_positions = slots.tolist(), positions.tolist()

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv.write_decode(layer, slots, positions, k, v)
            return rowwise_decode_attention(q, kv.k[layer], kv.v[layer], host_slots, host_positions)

        return self.backbone(embeds.to(kv.dtype), positions, attend)

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H] final-norm hidden -> [B, 6564] log-probs (fp32)."""
        return self.llm_decoder(hidden).float().log_softmax(-1)


# ---------------------------------------------------------------------- loading


def load_qwen2lm(
    model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Qwen2LM:
    """Build from `model_dir/llm.pt` (strict keys, tied lm_head dropped) without random init."""
    model_dir = Path(model_dir)
    cfg = read_model_config(model_dir).llm
    state = torch.load(model_dir / "llm.pt", map_location="cpu", weights_only=True, mmap=True)
    state.pop(TIED_LM_HEAD_KEY, None)
    with torch.device("meta"):
        lm = Qwen2LM(cfg)
    lm = lm.to_empty(device=device)
    lm.load_state_dict(state, strict=True)
    return lm.to(dtype).eval().requires_grad_(False)  # inference only: no autograd graphs


# ---------------------------------------------------------------------- reference generation loop


@torch.inference_mode()
def generate(
    lm: Qwen2LM,
    kv: KVCache,
    slot: int,
    lm_input: torch.Tensor,
    min_len: int,
    max_len: int,
    generator: torch.Generator | None = None,
    max_tokens: int | None = None,
) -> Iterator[int]:
    """Single-request unistream decode (§5.4): prefill, then sample/feed until a stop id or
    max_len (or max_tokens) tokens. Yields speech token ids; the stop id is not yielded."""
    cfg = lm.cfg
    device = lm_input.device
    limit = max_len if max_tokens is None else min(max_len, max_tokens)
    hidden = lm.prefill(lm_input, slot, 0, kv)[None]
    pos = int(lm_input.shape[0])
    recent = torch.full((1, cfg.win_size), -1, dtype=torch.long, device=device)
    slots = torch.tensor([slot], device=device)
    gens = None if generator is None else [generator]
    for step in range(limit):
        ignore_eos = torch.tensor([step < min_len], device=device)
        token = ras_sample(
            lm.logprobs(hidden), recent, ignore_eos, cfg.eos_token, cfg.top_p, cfg.top_k, cfg.tau_r, gens
        )
        tok = int(token[0])
        if tok in cfg.stop_token_ids:
            return
        yield tok
        if step + 1 == limit:
            return
        if pos >= kv.max_len:
            raise RuntimeError(f"KV slot full ({kv.max_len} positions)")
        recent = push_recent(recent, token)
        positions = torch.tensor([pos], device=device)
        hidden = lm.decode(lm.speech_embed(token), slots, positions, kv, span=pos + 1)
        pos += 1
