"""CosyVoice2 flow: speech tokens -> 80-bin mel (`CausalMaskedDiffWithXvec`, spec §6), batched.

One call handles B requests, each row = prompt tokens ++ generated tokens (right padded):
  spk = Linear(L2norm(embedding)); h = encoder(embed(tokens)); mu = encoder_proj(h);
  cond = prompt mel on the first 2P frames; x0 = fixed noise prefix; 10 cosine-scheduled Euler steps,
  each ONE estimator call on 2B rows [cond rows..., uncond rows (mu/spk/cond = 0)...] with CFG 0.7.
The prompt frames are dropped per row and the generated part returned left-aligned with its length.

Row b's result equals running it alone (batch invariance, see flow_encoder/flow_estimator docstrings):
masks everywhere, per-row look-ahead context, and the noise is position-fixed (`noise[:, :, :M_b]`).
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.config import FlowConfig
from kernels.networks.flow_encoder import UpsampleConformerEncoder, length_mask
from kernels.networks.flow_estimator import CausalConditionalDecoder, EstimatorInputs
from kernels.networks.step_cache import NO_CACHE, StepCache

NOISE_SEED = 0
NOISE_SHA256 = "584a26e6eaad944407a96c5999aaa5cd0a6a359309a841eade68bf805c072322"  # cases/flow.json


def fixed_noise(mel_bins: int, frames: int) -> Tensor:
    """`torch.manual_seed(0); torch.randn(1, bins, frames)` on a private generator (global RNG untouched)."""
    gen = torch.Generator(device="cpu").manual_seed(NOISE_SEED)
    return torch.randn(1, mel_bins, frames, generator=gen, device="cpu", dtype=torch.float32)


def noise_sha256(noise: Tensor) -> str:
    return hashlib.sha256(noise.detach().cpu().contiguous().numpy().astype("<f4").tobytes()).hexdigest()


def cosine_t_span(n_steps: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    t = torch.linspace(0, 1, n_steps + 1, device=device, dtype=dtype)
    return 1 - torch.cos(t * 0.5 * torch.pi)


class CausalConditionalCFM(nn.Module):
    """Holds the estimator (`decoder.estimator.*`) and the fixed noise (non-persistent buffer)."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.estimator = CausalConditionalDecoder(cfg.estimator)
        self.register_buffer("rand_noise", fixed_noise(cfg.output_size, cfg.noise_frames), persistent=False)

    def solve(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, streaming: bool,
              x0: Tensor | None = None, caches: list[StepCache] | None = None) -> Tensor:
        """Euler ODE solve with CFG for B rows (mu/cond `(B, 80, M)`, mask `(B, 1, M)`, spks `(B, 80)`).

        x0: the start noise (default: the fixed noise from frame 0). caches: one per Euler step, for
        streaming rows of new frames whose earlier frames are cached (kernels/runtime/flow_cache.py); each cache's
        rows are [cond rows..., uncond rows...] like the estimator's batch."""
        b, _, m = mu.shape
        if x0 is None:
            if m > self.rand_noise.size(2):
                raise ValueError(
                    f"flow input of {m} mel frames exceeds the {self.rand_noise.size(2)}-frame noise buffer")
            x0 = self.rand_noise[:, :, :m].expand(b, -1, -1)
        inp = self.estimator.prepare(
            torch.cat([mask, mask]), torch.cat([mu, torch.zeros_like(mu)]),
            torch.cat([spks, torch.zeros_like(spks)]), torch.cat([cond, torch.zeros_like(cond)]), streaming,
            cached=caches is not None)
        return self._euler(x0.float(), inp, b, caches)  # the ODE state stays fp32 (see _euler)

    def _euler(self, x: Tensor, inp: EstimatorInputs, b: int, caches: list[StepCache] | None) -> Tensor:
        # Same float32 time arithmetic as upstream: t accumulates dt, dt = t_span[k+1] - t. With a
        # bf16 estimator only its calls run in bf16: x, t and the update stay fp32 (mixed precision).
        t_span = cosine_t_span(self.cfg.n_timesteps, x.device, torch.float32)
        t, dt = t_span[0], t_span[1] - t_span[0]
        rate = self.cfg.inference_cfg_rate
        dtype = inp.static.dtype
        for step in range(1, len(t_span)):
            cache = NO_CACHE if caches is None else caches[step - 1]
            v = self.estimator.step(torch.cat([x, x]).to(dtype), t.expand(2 * b), inp, cache).float()
            v_cond, v_uncond = v[:b], v[b:]
            x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x.float()


class CausalMaskedDiffWithXvec(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(cfg.encoder, cfg.input_size, cfg.pre_lookahead_len)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = CausalConditionalCFM(cfg)

    @property
    def estimator(self) -> CausalConditionalDecoder:
        """The U-Net; `flow.estimator(x, mask, mu, t, spks, cond, streaming)` takes the fixture inputs."""
        return self.decoder.estimator

    def speaker(self, embedding: Tensor) -> Tensor:
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def encode(self, tokens: Tensor, token_lens: Tensor, streaming: bool, finalize: bool,
               cache: StepCache = NO_CACHE) -> tuple[Tensor, Tensor]:
        """-> (mu `(B, 80, Mmax)`, mel_lens `(B,)`); without finalize the last 3 tokens are context only.
        With a cache, each row holds a streaming request's tokens after its cached ones."""
        valid = length_mask(token_lens, tokens.size(1)).unsqueeze(-1)
        x = self.input_embedding(tokens.clamp(min=0).long()) * valid.to(self.input_embedding.weight.dtype)
        enc_lens = token_lens if finalize else token_lens - self.cfg.pre_lookahead_len
        if bool((enc_lens < 1).any()):
            raise ValueError("every row needs at least one token to encode (plus 3 look-ahead when not finalizing)")
        h = self.encoder(x, token_lens, enc_lens, streaming, cache)
        mu = self.encoder_proj(h).transpose(1, 2)
        return mu, enc_lens * self.cfg.token_mel_ratio

    @torch.inference_mode()
    def inference(self, tokens: Tensor, token_lens: Tensor, prompt_feat: Tensor, prompt_feat_lens: Tensor,
                  embedding: Tensor, streaming: bool, finalize: bool) -> tuple[Tensor, Tensor]:
        """Batched flow; returns the generated mel `(B, 80, Gmax)` (prompt frames dropped) and lengths `(B,)`."""
        token_lens = token_lens.to(tokens.device).long()
        prompt_feat_lens = prompt_feat_lens.to(tokens.device).long()
        spks = self.speaker(embedding)
        mu, mel_lens = self.encode(tokens, token_lens, streaming, finalize)
        m = mu.size(2)
        if bool((prompt_feat_lens > mel_lens).any()):
            raise ValueError("prompt_feat_lens exceed the encoded mel length")
        cond = self._prompt_cond(prompt_feat.to(mu.dtype), prompt_feat_lens, m)
        mask = length_mask(mel_lens, m).unsqueeze(1).to(mu.dtype)
        feat = self.decoder.solve(mu, mask, spks, cond, streaming)
        return self._generated(feat, prompt_feat_lens, mel_lens)

    @staticmethod
    def _prompt_cond(prompt_feat: Tensor, lens: Tensor, m: int) -> Tensor:
        f = min(prompt_feat.size(1), m)
        cond = prompt_feat.new_zeros(prompt_feat.size(0), m, prompt_feat.size(2))
        cond[:, :f] = prompt_feat[:, :f] * length_mask(lens, f).unsqueeze(-1).to(prompt_feat.dtype)
        return cond.transpose(1, 2)

    @staticmethod
    def _generated(feat: Tensor, start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
        gen_lens = end - start
        g = int(gen_lens.max())
        idx = start.unsqueeze(1) + torch.arange(g, device=feat.device).unsqueeze(0)  # (B, G)
        idx = idx.clamp(max=feat.size(2) - 1)
        out = torch.gather(feat, 2, idx.unsqueeze(1).expand(-1, feat.size(1), -1))
        return out * length_mask(gen_lens, g).unsqueeze(1).to(out.dtype), gen_lens
