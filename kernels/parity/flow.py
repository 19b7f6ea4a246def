"""Flow parity: noise, encoder mu, estimator step 0, offline mel, the streaming calls, batched runs."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from kernels.networks.flow import NOISE_SHA256, CausalMaskedDiffWithXvec, noise_sha256
from kernels.parity import CaseResult, compare, loaded_model

TOL = 1e-4  # flow mel fp32 CPU (reference README)


def load_flow(model_dir: Path) -> CausalMaskedDiffWithXvec:
    return loaded_model(Path(model_dir)).flow


def _rows(rows: list[tuple[Tensor, Tensor]], embedding: Tensor) -> dict[str, Tensor]:
    """Pack (tokens incl. prompt, prompt_feat) rows into right-padded batch inputs."""
    lens = torch.tensor([int(t.numel()) for t, _ in rows])
    flens = torch.tensor([int(f.size(0)) for _, f in rows])
    tokens = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
    feats = torch.zeros(len(rows), int(flens.max()), 80)
    for i, (t, f) in enumerate(rows):
        tokens[i, : t.numel()] = t
        feats[i, : f.size(0)] = f
    return {"tokens": tokens, "token_lens": lens, "prompt_feat": feats, "prompt_feat_lens": flens,
            "embedding": embedding.expand(len(rows), -1)}


def _one(flow: CausalMaskedDiffWithXvec, tokens: Tensor, feat: Tensor, emb: Tensor, streaming: bool,
         finalize: bool) -> Tensor:
    mel, _ = flow.inference(**_rows([(tokens, feat)], emb), streaming=streaming, finalize=finalize)
    return mel


def _trim(mel: Tensor, lens: Tensor, i: int) -> Tensor:
    return mel[i : i + 1, :, : int(lens[i])]


def run(model_dir: Path, cases_dir: Path) -> list[CaseResult]:
    from safetensors.torch import load_file

    flow = load_flow(model_dir)
    c = load_file(str(cases_dir / "flow.safetensors"))
    meta = json.loads((cases_dir / "flow.json").read_text())
    results: list[CaseResult] = []

    noise = flow.decoder.rand_noise
    sha_ok = noise_sha256(noise) == meta["cfm_rand_noise"].get("sha256_fp32_le", NOISE_SHA256)
    results.append(compare("flow.noise_head", noise[:, :, : c["cfm_rand_noise_head"].size(2)],
                           c["cfm_rand_noise_head"], 0.0, "sha256 ok" if sha_ok else "SHA256 MISMATCH"))
    if not sha_ok:
        results[-1] = CaseResult(results[-1].name, results[-1].max_abs, results[-1].max_rel, 0.0, False,
                                 "sha256 of the 15000-frame noise differs")

    prompt = c["prompt_token"][0].long()
    feat = c["prompt_feat"][0]
    emb = c["embedding"]
    full = torch.cat([prompt, c["tokens"][0].long()])
    with torch.inference_mode():
        mu, _ = flow.encode(full.unsqueeze(0), torch.tensor([full.numel()]), streaming=False, finalize=True)
        results.append(compare("flow.offline.mu", mu, c["offline.mu"], TOL))
        p = "offline.estimator_step0."
        out = flow.decoder.estimator(c[p + "x"], c[p + "mask"], c[p + "mu"], c[p + "t"], c[p + "spks"],
                                     c[p + "cond"], streaming=False)
        results.append(compare("flow.offline.estimator_step0.out", out, c[p + "out"], TOL))
    results.append(compare("flow.offline.mel", _one(flow, full, feat, emb, False, True), c["offline.mel"], TOL))

    calls = [x for x in meta["stream"]["calls_in_order"] if x["call"].startswith("flow")]
    stream_inputs = []
    for call in calls:
        name = call["call"]
        toks = torch.cat([prompt, c[f"stream.{name}.token"][0].long()])
        stream_inputs.append((toks, call["streaming"], call["finalize"]))
        mel = _one(flow, toks, feat, emb, call["streaming"], call["finalize"])
        results.append(compare(f"flow.stream.{name}.mel", mel, c[f"stream.{name}.mel"], TOL,
                               f"streaming={call['streaming']} finalize={call['finalize']}"))
    results.extend(_batched(flow, c, calls, stream_inputs, full, feat, emb))
    return results


def _batched(flow: CausalMaskedDiffWithXvec, c: dict[str, Tensor], calls: list[dict], stream_inputs: list,
             full: Tensor, feat: Tensor, emb: Tensor) -> list[CaseResult]:
    results: list[CaseResult] = []
    # The streaming calls whose flags agree, as one batch of different lengths.
    groups: dict[tuple[bool, bool], list[int]] = {}
    for i, (_, streaming, finalize) in enumerate(stream_inputs):
        groups.setdefault((streaming, finalize), []).append(i)
    for (streaming, finalize), idx in groups.items():
        if len(idx) < 2:
            continue
        mel, lens = flow.inference(**_rows([(stream_inputs[i][0], feat) for i in idx], emb),
                                   streaming=streaming, finalize=finalize)
        for row, i in enumerate(idx):
            name = calls[i]["call"]
            results.append(compare(f"flow.batched.stream.{name}.mel", _trim(mel, lens, row),
                                   c[f"stream.{name}.mel"], TOL, f"batch of {len(idx)}"))
    # Offline + a shorter row with a shorter prompt (different prompt and token lengths in one batch).
    short_prompt = 50
    short = torch.cat([full[:short_prompt], full[71 : 71 + 37]])
    short_feat = feat[: 2 * short_prompt]
    alone = _one(flow, short, short_feat, emb, False, True)
    mel, lens = flow.inference(**_rows([(full, feat), (short, short_feat)], emb), streaming=False, finalize=True)
    results.append(compare("flow.batched.offline.mel", _trim(mel, lens, 0), c["offline.mel"], TOL, "batch of 2"))
    results.append(compare("flow.batched.short_row_vs_alone", _trim(mel, lens, 1), alone, 1e-5, "batch of 2"))
    return results
