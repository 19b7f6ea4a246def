"""RAS sampler: kept sets on hand-built distributions, repetition resample, eos masking, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.networks.sampling import draw_uniforms, length_limits, push_recent, ras_sample

EOS = 6


def _logp(probs: list[float]) -> torch.Tensor:
    p = torch.tensor(probs, dtype=torch.float32)
    return torch.where(p > 0, p.log(), torch.tensor(-math.inf))[None]


def _sweep(
    logp: torch.Tensor,
    recent: torch.Tensor | None = None,
    ignore_eos: bool = False,
    n: int = 2000,
    u1: float = 0.5,
    **kw,
) -> list[int]:
    """Outputs for the first uniform swept over [0, 1) (n rows of one batch): the support and
    mass of the top draw."""
    recent = torch.full((1, 10), -1) if recent is None else recent
    u0 = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    u = torch.stack([u0, torch.full((n,), u1)], dim=-1)
    out = ras_sample(
        logp.expand(n, -1), recent.expand(n, -1), torch.full((n,), ignore_eos), EOS, uniforms=u, **kw
    )
    return out.tolist()


def _upstream_kept(probs: torch.Tensor, top_p: float, top_k: int) -> set[int]:
    """Literal reading of the upstream nucleus loop (spec §5.2 step 2)."""
    values, idx = probs.sort(descending=True, stable=True)
    kept, cum = [], 0.0
    for v, i in zip(values.tolist(), idx.tolist()):
        if cum < top_p and len(kept) < top_k:
            cum += v
            kept.append(i)
    return set(kept)


def test_top_p_keeps_the_crossing_token() -> None:
    # exclusive cumsum 0, .5, .7, .85 -> tokens 0, 1, 2 kept (2 crosses 0.8), 3.. dropped
    out = _sweep(_logp([0.5, 0.2, 0.15, 0.1, 0.05, 0.0, 0.0]))
    assert set(out) == {0, 1, 2}
    # mass within the kept set is renormalised: 0.5/0.85 of the draws are token 0
    assert out.count(0) / len(out) == pytest.approx(0.5 / 0.85, abs=2e-3)


def test_top_k_caps_flat_distribution_with_stable_order() -> None:
    out = _sweep(_logp([1 / 100] * 100), n=5000)
    assert set(out) == set(range(25))  # ties broken by index (stable sort), cap 25


@pytest.mark.parametrize("seed", range(5))
def test_kept_set_matches_upstream_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(40, generator=g) * 2.5
    probs = logits.softmax(-1)
    out = _sweep(logits.log_softmax(-1)[None], n=20000)
    assert set(out) == _upstream_kept(probs, 0.8, 25)


def test_repetition_resamples_from_full_distribution_without_the_token() -> None:
    logp = _logp([0.9, 0.04, 0.03, 0.02, 0.01, 0.0, 0.0])
    recent = torch.tensor([[-1] * 9 + [0]])  # token 0 once in the window: 1 >= 10 * 0.1
    outs = set()
    for j in range(200):
        outs.update(_sweep(logp, recent, n=5, u1=(j + 0.5) / 200))
    assert 0 not in outs
    assert outs == {1, 2, 3, 4}  # the tail beyond top-p is reachable in the fallback


def test_repetition_threshold_uses_tau() -> None:
    logp = _logp([0.99, 0.01, 0.0, 0.0, 0.0, 0.0, 0.0])
    once = torch.tensor([[-1] * 9 + [0]])
    twice = torch.tensor([[-1] * 8 + [0, 0]])
    assert set(_sweep(logp, once, n=50, tau_r=0.2)) == {0}  # 1 < 10 * 0.2
    assert 0 not in set(_sweep(logp, twice, n=50, tau_r=0.2))


def test_ignore_eos_masks_only_eos() -> None:
    probs = [0.0] * 8
    probs[EOS], probs[EOS + 1], probs[0] = 0.7, 0.2, 0.1
    logp = _logp(probs)
    assert EOS in set(_sweep(logp, ignore_eos=False, n=100))
    masked = set(_sweep(logp, ignore_eos=True, n=100))
    assert EOS not in masked and EOS + 1 in masked  # 6562-like ids stay possible (upstream)


def test_redraw_ids_are_drawn_again_and_every_other_draw_is_unchanged() -> None:
    """Rule 4 (bistream's special ids where upstream raises): a row that draws one of its redraw ids draws
    again without them; a draw that avoids them is exactly the draw without the rule (parity)."""
    probs = [0.0] * 8
    probs[EOS], probs[EOS + 1], probs[0], probs[1] = 0.3, 0.4, 0.2, 0.1
    logp = _logp(probs)
    redraw = torch.zeros(1, 8, dtype=torch.bool)
    redraw[0, EOS + 1] = True
    for u1 in (0.1, 0.5, 0.9):
        plain = _sweep(logp, n=200, u1=u1)
        kept = _sweep(logp, n=200, u1=u1, redraw=redraw.expand(200, -1))
        assert EOS + 1 in plain and EOS + 1 not in kept
        assert all(k == p for p, k in zip(plain, kept) if p != EOS + 1)  # upstream's draws stay
        assert {k for p, k in zip(plain, kept) if p == EOS + 1} <= {0, 1, EOS}  # the rest of the distribution
    none = torch.zeros(200, 8, dtype=torch.bool)
    assert _sweep(logp, n=200, redraw=none) == _sweep(logp, n=200)


def test_rows_are_independent_and_seeded_per_request() -> None:
    torch.manual_seed(0)
    logp = torch.randn(3, 300).log_softmax(-1)
    recent = torch.full((3, 10), -1)
    ignore = torch.tensor([False, True, False])
    gens = [torch.Generator().manual_seed(s) for s in (11, 22, 33)]
    batched = [ras_sample(logp, recent, ignore, EOS, generator=gens) for _ in range(20)]
    alone_gen = torch.Generator().manual_seed(22)
    alone = [ras_sample(logp[1:2], recent[1:2], ignore[1:2], EOS, generator=[alone_gen]) for _ in range(20)]
    assert [int(b[1]) for b in batched] == [int(a[0]) for a in alone]


def test_never_draws_zero_probability_at_top_of_cdf() -> None:
    logp = _logp([0.6, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0])
    u = torch.tensor([[1.0 - 2**-24, 1.0 - 2**-24]])
    tok = ras_sample(logp, torch.full((1, 10), -1), torch.tensor([False]), EOS, uniforms=u)
    assert int(tok[0]) in (0, 1)
    recent = torch.tensor([[-1] * 9 + [0]])
    for _ in range(3):  # fallback with token 0 masked must land on 1
        tok = ras_sample(logp, recent, torch.tensor([False]), EOS, uniforms=u)
        assert int(tok[0]) == 1


def test_draw_uniforms_shapes_and_generator_count() -> None:
    assert draw_uniforms(4, torch.device("cpu")).shape == (4, 2)
    with pytest.raises(ValueError):
        draw_uniforms(2, torch.device("cpu"), [torch.Generator()])


def test_length_limits_and_window_push() -> None:
    assert length_limits(25) == (50, 500)
    assert length_limits(7, 2.0, 20.0) == (14, 140)
    r = push_recent(torch.tensor([[-1, -1, 5]]), torch.tensor([9]))
    assert r.tolist() == [[-1, 5, 9]]


def test_topk_fast_path_equals_full_stable_sort() -> None:
    from kernels.networks.sampling import _top_k_sorted

    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        probs = (torch.randn(1 + trial % 8, 6564, generator=gen) * (1 + trial % 3)).softmax(-1)
        if trial % 5 == 0:  # ties inside the top-k: must fall back to the stable order
            probs[:, 10:40] = probs[:, 10:40].max()
        vals, idx = _top_k_sorted(probs, 25)
        ref_vals, ref_idx = probs.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(idx, ref_idx[:, :25]) and torch.equal(vals, ref_vals[:, :25])


def test_recent_window_pads_left_and_keeps_the_last_ids() -> None:
    from kernels.networks.sampling import recent_window

    got = recent_window([[], [5], list(range(15))], 4)
    assert got.tolist() == [[-1, -1, -1, -1], [-1, -1, -1, 5], [11, 12, 13, 14]]
