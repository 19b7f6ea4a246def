"""Repetition-aware sampling (RAS, §5.2/§5.3), vectorised over a batch of requests.

Per row, equivalent to upstream `ras_sampling`:
1. while `ignore_eos` (step < min_len) only the eos id is masked (-inf);
2. nucleus + top-k: sort p = softmax(logp) descending (stable), keep sorted element i while the
   exclusive cumulative mass before it is < top_p and i < top_k; draw among the kept;
3. if the drawn id occurs >= W * tau_r times in the last W generated ids, mask it and draw
   from the full renormalised distribution instead.
4. (ours) a row given `redraw` ids that drew one of them draws again, from the full distribution without
   them, with the second uniform: bistream's special ids where upstream raises (a fill after the text
   ended). Only draws upstream would fail on change, so parity holds wherever upstream works.

Draws use inverse-CDF sampling on uniforms (two per row per step, always both, so a request's
random stream depends only on its own generator and step count, never on batch composition or
on which branch ran). No host sync: the result stays on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NEG_INF = float("-inf")


def length_limits(n_text_tokens: int, min_ratio: float = 2.0, max_ratio: float = 20.0) -> tuple[int, int]:
    """(min_len, max_len) of generated speech tokens for a text of n tokens (prompt text excluded)."""
    return int(n_text_tokens * min_ratio), int(n_text_tokens * max_ratio)


def draw_uniforms(
    batch: int,
    device: torch.device,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """[B, 2] uniforms in [0, 1) on `device`: row b from generator[b] when a list is given.
    Each draw happens on its generator's own device (a CPU generator may serve a CUDA batch),
    so a seeded request gets the same uniforms on any device."""
    if generator is None or isinstance(generator, torch.Generator):
        src = device if generator is None else generator.device
        return torch.rand(batch, 2, device=src, generator=generator).to(device)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch}")
    if all(g is None or g.device.type == "cpu" for g in generator):
        # CPU generators (the runner's choice): B tiny host draws, then one copy, not B device launches
        return torch.stack([torch.rand(2, generator=g) for g in generator]).to(device)
    rows = [
        torch.rand(2, device=device if g is None else g.device, generator=g).to(device) for g in generator
    ]
    return torch.stack(rows)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of non-negative `weights` [B, N] (unnormalised) with uniform u [B].
    Never returns a zero-weight index (rounding at the top end is clamped to the last positive one)."""
    cdf = weights.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    ar = torch.arange(weights.shape[-1], device=weights.device)
    last_positive = torch.where(weights > 0, ar, -1).amax(-1)
    return torch.minimum(idx, last_positive)


def _top_k_sorted(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest probabilities per row in stable descending order (ties keep index order).

    On CPU a full stable sort of 6564 entries per row dominates a small model's decode step; topk
    gives the same order whenever the k+1 leading values are strictly decreasing (no tie can
    reorder them), which is checked, with the full sort as fallback. On CUDA the check would cost a
    host sync, so the sort stays."""
    vocab = probs.shape[-1]
    if probs.device.type == "cpu" and k < vocab:
        vals, idx = probs.topk(k + 1, dim=-1, sorted=True)
        if bool((vals[:, :-1] > vals[:, 1:]).all()):
            return vals[:, :k], idx[:, :k]
    sorted_p, sorted_idx = probs.sort(dim=-1, descending=True, stable=True)
    return sorted_p[:, :k], sorted_idx[:, :k]


def ras_sample(
    logp: torch.Tensor,
    recent: torch.Tensor,
    ignore_eos: torch.Tensor,
    eos_id: int,
    top_p: float = 0.8,
    top_k: int = 25,
    tau_r: float = 0.1,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    uniforms: torch.Tensor | None = None,
    redraw: torch.Tensor | None = None,
) -> torch.Tensor:
    """logp [B, V] log-probs; recent [B, W] last W generated ids (-1 padded); ignore_eos [B] bool.
    Returns LongTensor [B]. `uniforms` [B, 2] may be given instead of generators (e.g. drawn
    ahead of a CUDA-graph replay). `redraw` [B, V] bool: ids each row may not produce (rule 4)."""
    b, vocab = logp.shape
    if uniforms is None:
        uniforms = draw_uniforms(b, logp.device, generator)
    logp = logp.float().clone()
    logp[:, eos_id] = torch.where(ignore_eos.to(logp.device), NEG_INF, logp[:, eos_id])

    probs = logp.softmax(-1)
    sorted_p, sorted_idx = _top_k_sorted(probs, min(top_k, vocab))
    # exclusive cumsum as a running sum (same additions, same order as the upstream loop)
    before = torch.cat([torch.zeros_like(sorted_p[:, :1]), sorted_p.cumsum(-1)[:, :-1]], dim=-1)
    kept = torch.where(before < top_p, sorted_p, 0.0)
    kept[:, 0] = sorted_p[:, 0]  # the top token is always a candidate
    top = sorted_idx.gather(1, _inverse_cdf(kept, uniforms[:, 0]).unsqueeze(-1)).squeeze(-1)

    window = recent.shape[1]
    repeats = (recent == top.unsqueeze(-1)).sum(-1)
    hit = repeats >= window * tau_r
    if logp.device.type == "cpu":  # resample only the rows that repeated (host reads are free on CPU)
        rows = hit.nonzero().squeeze(-1)
        if rows.numel():
            masked = logp[rows].scatter(1, top[rows].unsqueeze(-1), NEG_INF)
            top = top.clone()
            top[rows] = _inverse_cdf(masked.softmax(-1), uniforms[rows, 1])
    else:
        masked = logp.scatter(1, top.unsqueeze(-1), NEG_INF)
        top = torch.where(hit, _inverse_cdf(masked.softmax(-1), uniforms[:, 1]), top)
    return top if redraw is None else _redraw(logp, top, redraw.to(logp.device), uniforms[:, 1])


def _redraw(logp: torch.Tensor, top: torch.Tensor, redraw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rule 4: the rows whose draw is one of their `redraw` ids draw again without those ids."""
    bad = redraw.gather(1, top.unsqueeze(-1)).squeeze(-1)
    if logp.device.type == "cpu":
        rows = bad.nonzero().squeeze(-1)
        if not rows.numel():
            return top
        top = top.clone()
        top[rows] = _inverse_cdf(logp[rows].masked_fill(redraw[rows], NEG_INF).softmax(-1), u[rows])
        return top
    return torch.where(bad, _inverse_cdf(logp.masked_fill(redraw, NEG_INF).softmax(-1), u), top)


def push_recent(recent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Shift each row's window left by one and append `tokens` [B] (returns a new tensor)."""
    return torch.cat([recent[:, 1:], tokens.to(recent.dtype).unsqueeze(-1)], dim=-1)


def recent_window(histories: Sequence[Sequence[int]], win: int) -> torch.Tensor:
    """[B, win] last `win` ids of each history, left-padded with -1, built in one tensor call."""
    rows = [[-1] * (win - len(h[-win:])) + list(h[-win:]) for h in histories]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), win)
