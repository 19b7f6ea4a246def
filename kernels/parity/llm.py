"""LLM parity: lm_input, teacher-forced KV-cache hidden/log-probs, full-forward log-probs,
and the same decode run as one B=3 batch over the three layouts (proves batching)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kernels.networks.kv_cache import KVCache
from kernels.networks.llm import Qwen2LM
from kernels.parity import CaseResult, compare, loaded_model

LAYOUTS = ("zero_shot", "cross_lingual", "instruct2")
TOL_LOGP, TOL_HIDDEN, TOL_INPUT = 1e-4, 1e-4, 1e-5


def build_model(model_dir: Path) -> Qwen2LM:
    return loaded_model(Path(model_dir)).llm


def _teacher_forced(lm: Qwen2LM, lm_input: torch.Tensor, cont: torch.Tensor, kv: KVCache, slot: int):
    """Prefill then one decode step per continuation token; hidden [n+1, H]."""
    hidden = [lm.prefill(lm_input, slot, 0, kv)]
    pos = lm_input.shape[0]
    for tok in cont:
        h = lm.decode(lm.speech_embed(tok[None]), torch.tensor([slot]), torch.tensor([pos]), kv)
        hidden.append(h[0])
        pos += 1
    return torch.stack(hidden)


def _batched(lm: Qwen2LM, inputs: list[torch.Tensor], cont: torch.Tensor, kv: KVCache) -> torch.Tensor:
    """All layouts at once: packed prefill into slots 0..B-1, then B-row decode; [B, n+1, H]."""
    b = len(inputs)
    slots = torch.arange(b)
    hidden = [lm.prefill_batch([(x, i, 0) for i, x in enumerate(inputs)], kv)]
    positions = torch.tensor([x.shape[0] for x in inputs])
    for tok in cont:
        embeds = lm.speech_embed(tok.repeat(b))
        hidden.append(lm.decode(embeds, slots, positions, kv, span=int(positions.max()) + 1))
        positions = positions + 1
    return torch.stack(hidden, dim=1)


def _layout_checks(
    label: str, layout: str, hidden: torch.Tensor, logp: torch.Tensor, fx: dict, meta: dict
) -> list[CaseResult]:
    results = [
        compare(f"llm.{label}.hidden_kv", hidden, fx[f"{layout}.hidden_kv"], TOL_HIDDEN),
        compare(f"llm.{label}.logp_kv", logp, fx[f"{layout}.logp_kv"], TOL_LOGP),
    ]
    ours, ref = logp.argmax(-1).tolist(), meta["layouts"][layout]["argmax_kv"]
    mismatches = sum(a != b for a, b in zip(ours, ref)) + abs(len(ours) - len(ref))
    results.append(
        CaseResult(
            f"llm.{label}.argmax_kv",
            float(mismatches),
            float(mismatches),
            0.0,
            mismatches == 0,
            "exact; value = mismatching rows",
        )
    )
    return results


@torch.inference_mode()
def run(model_dir: Path, cases_dir: Path) -> list[CaseResult]:
    from safetensors.torch import load_file

    fx = load_file(str(cases_dir / "llm.safetensors"))
    meta = json.loads((cases_dir / "llm.json").read_text(encoding="utf-8"))
    lm = build_model(Path(model_dir))
    q = lm.cfg.qwen
    cont = fx["continuation"].reshape(-1).long()
    kv = KVCache(q.num_layers, len(LAYOUTS), 256, q.num_kv_heads, q.head_dim)
    results: list[CaseResult] = []
    inputs = []
    for slot, name in enumerate(LAYOUTS):
        lm_input = lm.build_lm_input(
            fx[f"{name}.text"], fx[f"{name}.prompt_text"], fx[f"{name}.prompt_speech_token"]
        )
        inputs.append(lm_input)
        results.append(compare(f"llm.{name}.lm_input", lm_input, fx[f"{name}.lm_input"][0], TOL_INPUT))
        hidden = _teacher_forced(lm, lm_input, cont, kv, slot)
        results.extend(_layout_checks(name, name, hidden, lm.logprobs(hidden), fx, meta))

    # one full causal prefill over prompt + continuation (no incremental cache use)
    zs = inputs[0]
    full = lm.prefill_hidden(torch.cat([zs, lm.speech_embed(cont)]), 0, 0, kv)[zs.shape[0] - 1 :]
    results.append(compare("llm.zero_shot.logp_full", lm.logprobs(full), fx["zero_shot.logp_full"], TOL_LOGP))

    # CPU decode attends per row; the static masked path (what CUDA graphs capture) is checked too
    for label, rowwise in (("batched", True), ("batched_static", False)):
        lm.cpu_rowwise_decode = rowwise
        batched = _batched(lm, inputs, cont, kv)
        for i, name in enumerate(LAYOUTS):
            results.extend(
                _layout_checks(f"{label}.{name}", name, batched[i], lm.logprobs(batched[i]), fx, meta)
            )
    lm.cpu_rowwise_decode = True
    return results
