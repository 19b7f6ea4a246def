"""How far a faster numeric path moves the model's outputs from the fp32 eager path, on any checkpoint.

    python -m bench.fidelity --model-dir DIR [--llm-dtype auto|fp32|bf16|fp16] [--flow-dtype ...]
        [--flow-steps N] [--llm-int8 0|1] [--first-chunk-tokens N] [--tokens 100] [--json FILE] [--markdown FILE]

Both models load from the same directory: the reference in fp32, the candidate with the given dtypes
("auto": what the server would choose on this machine, kernels/runtime/auto_settings.py) and, with
`--flow-steps`, that many Euler steps in its flow ODE instead of upstream's 10. Same voice
(bench.engine's synthetic prompt), same text, no sampling:
- LLM: the reference decodes `--tokens` speech tokens greedily (stop ids masked: fixed length). Then
  `teacher_forced_top1`: the share of positions where the candidate, fed the reference's tokens (one
  decode step each, as served), picks
  the same next token (errors do not compound); `logp_max_abs_diff`: the largest difference of the
  log-probability either gives the reference's token; `greedy_common_prefix`: how many tokens the
  candidate's own greedy decode shares with the reference's before the first difference (one near-tie
  flips everything after it, so on random weights this is the harshest figure).
- Flow: the reference tokens after the prompt's, to mel, offline (finalize) and as one streaming call
  (chunk masks, 3 lookahead tokens); `mel_rel_mean` = mean |candidate - reference| / mean |reference|,
  and `mel_max_abs`. "incremental": the candidate as the server streams it, chunk by chunk on its flow
  cache (hops 25 + pad, 50, 50, ...), against the reference's one streaming call.
- First chunk (`--first-chunk-tokens N`, the server's short first chunk): on the fp32 reference, the mel
  of the first N generated tokens from a streaming call over prompt + N + 3 tokens (an incomplete flow
  chunk) against the same frames from upstream's first chunk (prompt + 25 + pad + 3 tokens). Every later
  frame is upstream's (tests/test_kernels_engine.py), so this is all the option moves.
HiFT always runs in fp32, so the same mel gives the same waveform.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.engine import UPSTREAM_FLOW_STEPS, llm_prompt_embeds, make_voice
from bench.outputs import write_results
from bench.provenance import commit, cpu_name, now_iso
from kernels.runtime.auto_settings import settings_for
from kernels.runtime.engine import weight_dtype
from server.config import FLOW_DTYPES, LLM_DTYPES


def greedy_tokens(model: Any, embeds: torch.Tensor, n: int) -> list[int]:
    """`n` greedy speech tokens after the prompt embeddings (stop ids masked)."""
    from kernels.networks.kv_cache import KVCache

    lm, cfg = model.llm, model.llm.cfg
    dtype = next(lm.parameters()).dtype
    kv = KVCache.for_model(model.config.llm.qwen, 1, embeds.shape[0] + n + 1, embeds.device, dtype)
    stops = list(cfg.stop_token_ids)
    out: list[int] = []
    hidden = lm.prefill(embeds, 0, 0, kv)[None]
    slots = torch.zeros(1, dtype=torch.long)
    for step in range(n):
        logp = lm.logprobs(hidden)
        logp[:, stops] = float("-inf")
        out.append(int(logp.argmax(-1)))
        if step + 1 < n:
            position = torch.tensor([embeds.shape[0] + step])
            hidden = lm.decode(lm.speech_embed(torch.tensor(out[-1:])), slots, position, kv)
    return out


def teacher_forced_logp(model: Any, embeds: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] log-probs of each next token given the prompt and the tokens before it. Fed as the
    server feeds them: the prompt in one prefill, then one decode step a token (so a path that differs
    only for small steps, `--llm-int8`, is measured where it acts)."""
    from kernels.networks.kv_cache import KVCache

    lm = model.llm
    dtype = next(lm.parameters()).dtype
    kv = KVCache.for_model(model.config.llm.qwen, 1, embeds.shape[0] + len(tokens), embeds.device, dtype)
    hidden = [lm.prefill(embeds, 0, 0, kv)[None]]
    slots = torch.zeros(1, dtype=torch.long)
    for i, token in enumerate(tokens[:-1]):
        position = torch.tensor([embeds.shape[0] + i])
        hidden.append(lm.decode(lm.speech_embed(torch.tensor([token])), slots, position, kv))
    logp = lm.logprobs(torch.cat(hidden))
    logp[:, list(lm.cfg.stop_token_ids)] = float("-inf")
    return logp


def compare_llm(ref: Any, cand: Any, model_dir: Path, voice: Any, n: int) -> dict[str, Any]:
    embeds = llm_prompt_embeds(ref, model_dir, voice)
    want = greedy_tokens(ref, embeds, n)
    cand_embeds = llm_prompt_embeds(cand, model_dir, voice)
    got = greedy_tokens(cand, cand_embeds, n)
    ref_logp = teacher_forced_logp(ref, embeds, want)
    cand_logp = teacher_forced_logp(cand, cand_embeds, want)
    chosen = torch.tensor(want)[:, None]
    agree = (cand_logp.argmax(-1) == ref_logp.argmax(-1)).float().mean()
    diff = (cand_logp.gather(1, chosen) - ref_logp.gather(1, chosen)).abs().max()
    prefix = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), n)
    return {"tokens": n, "teacher_forced_top1": round(float(agree), 4),
            "logp_max_abs_diff": round(float(diff), 5), "greedy_common_prefix": prefix,
            "reference_tokens": want}


def _mel(model: Any, voice: Any, tokens: list[int], streaming: bool) -> torch.Tensor:
    dtype = next(model.flow.parameters()).dtype
    ids = torch.tensor([list(voice.speech_tokens) + tokens])
    feat = torch.as_tensor(voice.mel, dtype=dtype)[None]
    emb = torch.as_tensor(voice.embedding, dtype=dtype)[None]
    mel, _ = model.flow.inference(ids, torch.tensor([ids.shape[1]]), feat, torch.tensor([feat.shape[1]]), emb,
                                  streaming, not streaming)
    return mel.float()


def _incremental_mel(model: Any, voice: Any, tokens: list[int]) -> torch.Tensor | None:
    """The generated frames as the engine computes them: non-final chunk calls on a flow cache (None:
    too few tokens for one)."""
    from kernels.runtime.flow_cache import FlowStreamState, IncrementalFlow, StreamCall

    dtype = next(model.flow.parameters()).dtype
    ids = torch.tensor(list(voice.speech_tokens) + tokens)
    feat, emb = torch.as_tensor(voice.mel, dtype=dtype), torch.as_tensor(voice.embedding, dtype=dtype)
    prompt, grid, look = len(voice.speech_tokens), model.config.chunk_size, model.flow.cfg.pre_lookahead_len
    inc, state, mels, end = IncrementalFlow(model.flow), FlowStreamState(), [], grid + (-prompt % grid)
    while end + look <= len(tokens):
        mel, first = inc.forward([StreamCall(state, ids[: prompt + end + look], feat, emb)])[0]
        mels.append(mel[:, max(0, model.flow.cfg.token_mel_ratio * prompt - first):])
        end += 2 * grid
    return torch.cat(mels, dim=1)[None].float() if mels else None


def _diff(want: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    n = min(want.shape[-1], got.shape[-1])
    want, got = want[..., :n], got[..., :n]
    diff = (got - want).abs()
    return {"frames": n, "mel_rel_mean": round(float(diff.mean() / want.abs().mean()), 6),
            "mel_max_abs": round(float(diff.max()), 5)}


def compare_flow(ref: Any, cand: Any, voice: Any, tokens: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, streaming in (("offline", False), ("streaming", True)):
        out[name] = _diff(_mel(ref, voice, tokens, streaming), _mel(cand, voice, tokens, streaming))
    incremental = _incremental_mel(cand, voice, tokens)
    if incremental is not None:
        out["incremental"] = _diff(_mel(ref, voice, tokens, True), incremental)
    return out


def compare_first_chunk(ref: Any, voice: Any, tokens: list[int], lead: int) -> dict[str, Any]:
    """The first `lead` tokens' mel from a first chunk of `lead` tokens against upstream's first chunk."""
    prompt, grid = len(voice.speech_tokens), ref.config.chunk_size
    first = grid + (-prompt % grid)  # upstream's first hop: 25 + the prompt's pad to the grid
    look = ref.config.flow.pre_lookahead_len
    frames = slice(0, ref.config.flow.token_mel_ratio * lead)  # the mel comes without the prompt's frames
    want = _mel(ref, voice, tokens[: first + look], True)[..., frames]
    got = _mel(ref, voice, tokens[: lead + look], True)[..., frames]
    diff = (got - want).abs()
    return {"frames": int(want.shape[-1]), "mel_rel_mean": round(float(diff.mean() / want.abs().mean()), 6),
            "mel_max_abs": round(float(diff.max()), 5), "tokens": lead}


def run(model_dir: Path, llm_dtype: str, flow_dtype: str, tokens: int, flow_steps: int = 0,
        llm_int8: bool = False, first_chunk: int = 0, packed_linears: bool = True) -> dict[str, Any]:
    from kernels.weights.model import load_model

    settings = settings_for(model_dir, llm_dtype=llm_dtype, flow_dtype=flow_dtype)
    torch.set_grad_enabled(False)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    ref = load_model(model_dir)
    cand = load_model(model_dir, llm_dtype=weight_dtype(settings.llm_dtype, False),
                      flow_dtype=weight_dtype(settings.flow_dtype, False), flow_steps=flow_steps or None, llm_int8=llm_int8,
                      packed_linears=packed_linears)
    voice = make_voice(model_dir)
    with torch.inference_mode():
        llm = compare_llm(ref, cand, model_dir, voice, tokens)
        flow = compare_flow(ref, cand, voice, llm["reference_tokens"])
        if first_chunk:
            flow[f"first {first_chunk} tokens as the first chunk, vs upstream's first chunk"] = compare_first_chunk(
                ref, voice, llm["reference_tokens"], first_chunk)
    return {
        "meta": {"date": now_iso(), "commit": commit(), "cpu": cpu_name(), "model_dir": str(model_dir),
                 "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 1)},
        "candidate": {"llm": settings.llm_dtype, "flow": settings.flow_dtype,
                      "flow_steps": cand.config.flow.n_timesteps, "llm_int8": llm_int8,
                      "packed_linears": packed_linears},
        "reasons": list(settings.reasons),
        "llm": llm,
        "flow": flow,
    }


def markdown(result: dict[str, Any]) -> str:
    c, llm, meta = result["candidate"], result["llm"], result["meta"]
    steps = c.get("flow_steps", UPSTREAM_FLOW_STEPS)
    int8 = " + int8 weights" if c.get("llm_int8") else ""
    packed = " (linears packed)" if c.get("packed_linears") else ""
    lines = [(f"Candidate llm {c['llm']}{int8}, flow {c['flow']}"
              f"{f' ({steps} ODE steps)' if steps != UPSTREAM_FLOW_STEPS else ''}{packed} "
              f"against fp32 eager ({UPSTREAM_FLOW_STEPS} steps) · {meta['model_dir']} · "
             f"{meta['cpu']} · {meta['date']} · {meta['commit']}"), "",
             "| figure | value |", "| --- | --- |",
             f"| LLM teacher-forced top-1 agreement ({llm['tokens']} tokens) | {llm['teacher_forced_top1']:.2%} |",
             f"| LLM max abs diff of the reference token's log-prob | {llm['logp_max_abs_diff']:.4f} |",
             f"| LLM greedy tokens equal before the first difference | {llm['greedy_common_prefix']} / {llm['tokens']} |"]
    for name, f in result["flow"].items():
        lines.append(f"| flow {name} mel: mean rel diff / max abs diff ({f['frames']} frames) | "
                     f"{f['mel_rel_mean']:.3%} / {f['mel_max_abs']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--llm-dtype", default="auto", choices=LLM_DTYPES)
    p.add_argument("--flow-dtype", default="auto", choices=FLOW_DTYPES)
    p.add_argument("--tokens", type=int, default=100, help="greedy speech tokens to compare")
    p.add_argument("--flow-steps", type=int, default=0, help="Euler steps of the candidate's flow (0: upstream's 10)")
    p.add_argument("--llm-int8", type=int, choices=(0, 1), default=0,
                   help="the candidate's LLM with int8 weights for small steps (as --llm-int8 1 on the server)")
    p.add_argument("--packed-linears", type=int, choices=(0, 1), default=1,
                   help="the candidate's linears on oneDNN-packed weights (the server's default on a CPU)")
    p.add_argument("--first-chunk-tokens", type=int, default=0,
                   help="also measure a first streaming chunk of this many tokens (fp32 reference, see above)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    result = run(args.model_dir, args.llm_dtype, args.flow_dtype, args.tokens, args.flow_steps, bool(args.llm_int8),
                 args.first_chunk_tokens, bool(args.packed_linears))
    text = markdown(result)
    print(text, end="")
    write_results(result, text, args.json, args.markdown, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
