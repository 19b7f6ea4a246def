"""HiFT vocoder of CosyVoice2 (spec §7): F0 predictor, NSF sine source, HiFi-GAN/iSTFT generator.

Pipeline for a mel `[B, 80, T]` (L = 480·T samples at 24 kHz):
  f0 = |Linear(ELU-conv stack(mel))|                         [B, T] Hz
  s  = tanh(l_linear(0.1·sin(phase)·uv + noise_amp·noise))   [B, 1, L]   (9 harmonics)
  wav = clamp(iSTFT(conv_post(generator(mel, STFT(s)))), ±0.99)

Weights are plain tensors at run time: `fold_weight_norm` turns the checkpoint's (g, v) pairs
into `weight` once at load, so the forward pass never recomputes norms.

The only randomness is the additive source noise (the random initial phase upstream adds is
never read, spec App. A.9). Parity injects the recorded noise; production draws it from a
per-request generator.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.config import HiftConfig

_PARAM_G = ".parametrizations.weight.original0"
_PARAM_V = ".parametrizations.weight.original1"
_LEGACY_G = ".weight_g"
_LEGACY_V = ".weight_v"


# ---------------------------------------------------------------- checkpoint folding


def _split_weight_norm_key(key: str) -> tuple[str, str] | None:
    """`conv.parametrizations.weight.original0` -> ("conv", "g"); None for ordinary keys."""
    for suffix, role in ((_PARAM_G, "g"), (_PARAM_V, "v"), (_LEGACY_G, "g"), (_LEGACY_V, "v")):
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def fold_weight_norm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip `generator.` and fold every weight-norm (g, v) pair into `<m>.weight`.

    weight = g · v / ||v||, norm over all dims but 0 (torch's weight_norm default dim=0; for
    ConvTranspose1d dim 0 is the *input* channel, and g is stored that way too, §9.3).
    """
    pairs: dict[str, dict[str, tuple[str, Tensor]]] = {}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("generator.")
        split = _split_weight_norm_key(name)
        if split is None:
            out[name] = value
            continue
        module, role = split
        pairs.setdefault(module, {})[role] = (key, value)
    for module, parts in pairs.items():
        if "g" not in parts or "v" not in parts:
            have_key = next(iter(parts.values()))[0]
            missing = "v (direction)" if "g" in parts else "g (magnitude)"
            raise ValueError(f"weight norm: {have_key} has no matching {missing} tensor")
        g, v = parts["g"][1], parts["v"][1]
        if f"{module}.weight" in out:
            raise ValueError(f"weight norm: {module}.weight present both plain and as (g, v)")
        # Same kernel torch's parametrization runs, so folded weights equal upstream's bitwise.
        out[f"{module}.weight"] = torch._weight_norm(v.float(), g.float(), 0).contiguous()
    return out


# ---------------------------------------------------------------- building blocks


class Snake(nn.Module):
    """x + sin²(αx)/(α + 1e-9), per-channel α on a linear scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


def _padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock(nn.Module):
    """Three (Snake, dilated conv, Snake, conv) residual units; same length in and out."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_padding(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=_padding(kernel, 1)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """ConvRNNF0Predictor: 5 × (conv k3 + ELU), Linear → |·| (Hz). Keys `condnet.{0,2,4,6,8}`."""

    def __init__(self, in_channels: int, cond_channels: int, num_layers: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: Tensor) -> Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


class SourceModule(nn.Module):
    """Holds `l_linear` (9 harmonics → 1) under the upstream key `m_source.l_linear`."""

    def __init__(self, num_harmonics: int) -> None:
        super().__init__()
        self.l_linear = nn.Linear(num_harmonics, 1)


def draw_normal(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """N(0,1) drawn on the generator's device (a CPU generator may feed a GPU model)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


# ---------------------------------------------------------------- the generator


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.upsample_scale = cfg.samples_per_frame  # 480
        self.num_harmonics = cfg.nb_harmonics + 1
        n_fft, base = cfg.istft_n_fft, cfg.base_channels
        self.num_kernels = len(cfg.resblock_kernel_sizes)

        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        self.m_source = SourceModule(self.num_harmonics)
        self.conv_pre = nn.Conv1d(cfg.in_channels, base, 7, padding=3)

        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        # Source STFT frames are at the final rate; stage i sees them downsampled by the
        # product of the later upsample rates (15, 3, 1 for [8, 5, 3]).
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        rates = list(cfg.upsample_rates)
        for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            ch = base // 2 ** (i + 1)
            down = math.prod(rates[i + 1:])
            if down == 1:
                self.source_downs.append(nn.Conv1d(n_fft + 2, ch, 1))
            else:
                self.source_downs.append(nn.Conv1d(n_fft + 2, ch, down * 2, down, padding=down // 2))
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))

        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, tuple(d)))
        self.conv_post = nn.Conv1d(base // 2 ** len(self.ups), n_fft + 2, 7, padding=3)

        # Periodic Hann computed in float64 then rounded (as scipy's get_window(...).astype(f32)).
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("stft_window", window, persistent=False)
        harmonics = torch.arange(1, self.num_harmonics + 1, dtype=torch.float32)
        self.register_buffer("harmonics", harmonics, persistent=False)

    # -- F0 and source ------------------------------------------------------

    def f0(self, mel: Tensor) -> Tensor:
        """mel [B, 80, T] -> f0 [B, T] in Hz (voiced iff > nsf_voiced_threshold)."""
        return self.f0_predictor(mel)

    def sine_phase(self, f0: Tensor) -> Tensor:
        """Per-sample phase of the 9 harmonics, [B, 9, L] (SineGen2, spec §7.2 steps 1-5).

        Upstream computes rad on the 480× nearest-upsampled f0 and linearly downsamples it back;
        the downsample reads two equal samples of the frame, so rad at frame rate is identical.
        """
        rad = (f0.unsqueeze(-1) * self.harmonics / self.cfg.sampling_rate) % 1  # [B, T, 9]
        phase = torch.cumsum(rad, dim=1) * 2 * math.pi
        return F.interpolate(phase.transpose(1, 2) * self.upsample_scale, scale_factor=self.upsample_scale,
                             mode="linear")

    def source(self, f0: Tensor, noise: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """NSF source s [B, 1, L] from f0 [B, T]; noise [B, L, 9] N(0,1), drawn if not given."""
        cfg = self.cfg
        batch, frames = f0.shape
        length = frames * self.upsample_scale
        sine = torch.sin(self.sine_phase(f0)) * cfg.nsf_alpha  # [B, 9, L]
        uv = (f0 > cfg.nsf_voiced_threshold).float().repeat_interleave(self.upsample_scale, dim=1)
        uv = uv.unsqueeze(1)  # [B, 1, L]
        noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        if noise is None:
            noise_ch_first = draw_normal((batch, self.num_harmonics, length), generator, f0)
        else:
            if noise.shape != (batch, length, self.num_harmonics):
                raise ValueError(f"noise shape {tuple(noise.shape)} != {(batch, length, self.num_harmonics)}")
            noise_ch_first = noise.transpose(1, 2)
        waves = sine * uv + noise_amp * noise_ch_first  # [B, 9, L]
        lin = self.m_source.l_linear
        return torch.tanh(torch.matmul(lin.weight, waves) + lin.bias[:, None])  # [B, 1, L]

    # -- generator + iSTFT ------------------------------------------------------

    def _source_stft(self, s: Tensor) -> Tensor:
        n_fft, hop = self.cfg.istft_n_fft, self.cfg.istft_hop
        spec = torch.stft(s.squeeze(1), n_fft, hop, n_fft, window=self.stft_window, center=True,
                          pad_mode="reflect", return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)  # [B, 18, L/4 + 1]

    def decode(self, mel: Tensor, s: Tensor) -> Tensor:
        """mel [B, 80, T], source s [B, 1, L] -> waveform [B, L] clamped to ±audio_limit."""
        cfg = self.cfg
        s_stft = self._source_stft(s)
        x = self.conv_pre(mel)
        last = len(self.ups) - 1
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == last:
                x = F.pad(x, (1, 0), mode="reflect")  # 120T -> 120T + 1 STFT frames
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as upstream
        half = cfg.istft_n_fft // 2 + 1
        magnitude = torch.exp(x[:, :half]).clamp(max=1e2)
        phase = torch.sin(x[:, half:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec, cfg.istft_n_fft, cfg.istft_hop, cfg.istft_n_fft, window=self.stft_window,
                          center=True)
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit)

    def inference(self, mel: Tensor, cache_source: Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """mel [B, 80, T] -> (wav [B, L], s [B, 1, L]); s[:, :, :S] = cache_source when given."""
        s = self.source(self.f0(mel), generator=generator)
        if cache_source is not None and cache_source.shape[-1] > 0:
            s[:, :, : cache_source.shape[-1]] = cache_source
        return self.decode(mel, s), s


def load_hift(path: str, cfg: HiftConfig) -> HiFTGenerator:
    """Build from a released `hift.pt` (weight-norm folded, strict key match), eval mode."""
    raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    model = HiFTGenerator(cfg)
    model.load_state_dict(fold_weight_norm(raw), strict=True)
    return model.eval()
