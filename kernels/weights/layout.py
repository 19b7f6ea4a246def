"""Key -> shape layout of the released `llm.pt` / `flow.pt` / `hift.pt`, from config dims alone.

The layout mirrors the module trees upstream builds (Qwen2LM, CausalMaskedDiffWithXvec with
UpsampleConformerEncoder + CausalConditionalDecoder, HiFTGenerator) in state_dict order, in the
RELEASED naming: hift convs use `parametrizations.weight.original0/original1` (g, v) and llm.pt
carries the tied, unused `llm.model.lm_head.weight`. It is the single source of truth for strict
loading (kernels/weights/checkpoint.py) and for the random-checkpoint maker (kernels/weights/make_checkpoint.py).
"""
from __future__ import annotations

from frontend.model_files import WEIGHT_FILES
from kernels.config import (
    EncoderConfig,
    EstimatorConfig,
    FlowConfig,
    HiftConfig,
    LLMConfig,
    ModelConfig,
    QwenConfig,
)

Shape = tuple[int, ...]
Layout = dict[str, Shape]

FILES = WEIGHT_FILES
LM_HEAD_KEY = "llm.model.lm_head.weight"
EMBED_TOKENS_KEY = "llm.model.model.embed_tokens.weight"
NUM_UP_BLOCKS_CONV_STRIDE = 2  # Upsample1D(stride 2): conv kernel = 2 * stride + 1


def _linear(out: Layout, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _conv(out: Layout, name: str, c_out: int, c_in: int, k: int) -> None:
    out[f"{name}.weight"] = (c_out, c_in, k)
    out[f"{name}.bias"] = (c_out,)


def _norm(out: Layout, name: str, dim: int) -> None:
    out[f"{name}.weight"] = (dim,)
    out[f"{name}.bias"] = (dim,)


# ---------------------------------------------------------------- llm.pt


def llm_layout(cfg: LLMConfig) -> Layout:
    q = cfg.qwen
    hd = q.head_dim
    out: Layout = {"llm_embedding.weight": (2, cfg.llm_input_size)}  # rows: sos, task_id
    out[EMBED_TOKENS_KEY] = (q.vocab_size, q.hidden_size)
    for i in range(q.num_layers):
        p = f"llm.model.model.layers.{i}."
        _linear(out, p + "self_attn.q_proj", q.num_heads * hd, q.hidden_size)
        _linear(out, p + "self_attn.k_proj", q.num_kv_heads * hd, q.hidden_size)
        _linear(out, p + "self_attn.v_proj", q.num_kv_heads * hd, q.hidden_size)
        _linear(out, p + "self_attn.o_proj", q.hidden_size, q.num_heads * hd, bias=False)
        _linear(out, p + "mlp.gate_proj", q.intermediate_size, q.hidden_size, bias=False)
        _linear(out, p + "mlp.up_proj", q.intermediate_size, q.hidden_size, bias=False)
        _linear(out, p + "mlp.down_proj", q.hidden_size, q.intermediate_size, bias=False)
        out[p + "input_layernorm.weight"] = (q.hidden_size,)
        out[p + "post_attention_layernorm.weight"] = (q.hidden_size,)
    out["llm.model.model.norm.weight"] = (q.hidden_size,)
    out[LM_HEAD_KEY] = (q.vocab_size, q.hidden_size)  # tied to embed_tokens, unused
    # llm_output_size == Qwen hidden size (the decoder reads the backbone's last hidden state)
    _linear(out, "llm_decoder", cfg.num_speech_outputs, q.hidden_size)
    out["speech_embedding.weight"] = (cfg.num_speech_outputs, cfg.llm_input_size)
    return out


# ---------------------------------------------------------------- flow.pt


def _conformer_layer(out: Layout, p: str, enc: EncoderConfig) -> None:
    d, h = enc.output_size, enc.attention_heads
    out[p + "self_attn.pos_bias_u"] = (h, d // h)
    out[p + "self_attn.pos_bias_v"] = (h, d // h)
    for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
        _linear(out, p + "self_attn." + name, d, d)
    _linear(out, p + "self_attn.linear_pos", d, d, bias=False)
    _linear(out, p + "feed_forward.w_1", enc.linear_units, d)
    _linear(out, p + "feed_forward.w_2", d, enc.linear_units)
    _norm(out, p + "norm_ff", d)
    _norm(out, p + "norm_mha", d)


def _encoder(out: Layout, input_size: int, enc: EncoderConfig) -> None:
    d = enc.output_size  # upstream hard-codes 512 for pre-lookahead / upsample; == output_size
    p = "encoder."
    _linear(out, p + "embed.out.0", d, input_size)
    _norm(out, p + "embed.out.1", d)
    _norm(out, p + "after_norm", d)
    _conv(out, p + "pre_lookahead_layer.conv1", d, d, 4)  # kernel pre_lookahead_len + 1
    _conv(out, p + "pre_lookahead_layer.conv2", d, d, 3)
    for i in range(enc.num_blocks):
        _conformer_layer(out, f"{p}encoders.{i}.", enc)
    _conv(out, p + "up_layer.conv", d, d, 2 * NUM_UP_BLOCKS_CONV_STRIDE + 1)
    _linear(out, p + "up_embed.out.0", d, d)
    _norm(out, p + "up_embed.out.1", d)
    for i in range(enc.num_up_blocks):
        _conformer_layer(out, f"{p}up_encoders.{i}.", enc)


def _resnet(out: Layout, p: str, c_in: int, c_out: int, time_dim: int) -> None:
    _linear(out, p + "mlp.1", c_out, time_dim)
    _conv(out, p + "block1.block.0", c_out, c_in, 3)
    _norm(out, p + "block1.block.2", c_out)
    _conv(out, p + "block2.block.0", c_out, c_out, 3)
    _norm(out, p + "block2.block.2", c_out)
    _conv(out, p + "res_conv", c_out, c_in, 1)


def _transformer(out: Layout, p: str, dim: int, est: EstimatorConfig) -> None:
    inner = est.num_heads * est.attention_head_dim
    _norm(out, p + "norm1", dim)
    for name in ("to_q", "to_k", "to_v"):
        _linear(out, p + "attn1." + name, inner, dim, bias=False)
    _linear(out, p + "attn1.to_out.0", dim, inner)
    _norm(out, p + "norm3", dim)
    _linear(out, p + "ff.net.0.proj", 4 * dim, dim)  # diffusers FeedForward mult=4
    _linear(out, p + "ff.net.2", dim, 4 * dim)


def _unet_level(out: Layout, p: str, c_in: int, c_out: int, time_dim: int, est: EstimatorConfig) -> None:
    _resnet(out, p + "0.", c_in, c_out, time_dim)
    for j in range(est.n_blocks):
        _transformer(out, f"{p}1.{j}.", c_out, est)


def _estimator(out: Layout, est: EstimatorConfig) -> None:
    p = "decoder.estimator."
    ch = est.channels
    time_dim = 4 * ch[0]
    _linear(out, p + "time_mlp.linear_1", time_dim, est.in_channels)
    _linear(out, p + "time_mlp.linear_2", time_dim, time_dim)
    c_out = est.in_channels
    for i, c in enumerate(ch):
        c_in, c_out = c_out, c
        _unet_level(out, f"{p}down_blocks.{i}.", c_in, c_out, time_dim, est)
        # last level: CausalConv1d(k3); otherwise Downsample1D = Conv1d(k3, s2)
        _conv(out, f"{p}down_blocks.{i}.2", c_out, c_out, 3)
    for i in range(est.num_mid_blocks):
        _unet_level(out, f"{p}mid_blocks.{i}.", ch[-1], ch[-1], time_dim, est)
    up = tuple(reversed(ch)) + (ch[0],)
    for i in range(len(ch)):
        c_in, c_out = 2 * up[i], up[i + 1]
        _unet_level(out, f"{p}up_blocks.{i}.", c_in, c_out, time_dim, est)
        last = i == len(ch) - 1
        # last level: CausalConv1d(k3); otherwise ConvTranspose1d(k4, s2) (weight [in, out, k])
        _conv(out, f"{p}up_blocks.{i}.2", c_out, c_out, 3 if last else 4)
    _conv(out, p + "final_block.block.0", up[-1], up[-1], 3)
    _norm(out, p + "final_block.block.2", up[-1])
    _conv(out, p + "final_proj", est.out_channels, up[-1], 1)


def flow_layout(cfg: FlowConfig) -> Layout:
    out: Layout = {"input_embedding.weight": (cfg.vocab_size, cfg.input_size)}
    _linear(out, "spk_embed_affine_layer", cfg.output_size, cfg.spk_embed_dim)
    _encoder(out, cfg.input_size, cfg.encoder)
    _linear(out, "encoder_proj", cfg.output_size, cfg.encoder.output_size)
    _estimator(out, cfg.estimator)
    return out


# ---------------------------------------------------------------- hift.pt


def _wn_conv(out: Layout, name: str, c_out: int, c_in: int, k: int, transposed: bool = False) -> None:
    """Weight-normed conv: bias, then g (norm over all dims but 0) and v, release naming."""
    v = (c_in, c_out, k) if transposed else (c_out, c_in, k)
    out[f"{name}.bias"] = (c_out,)
    out[f"{name}.parametrizations.weight.original0"] = (v[0], 1, 1)
    out[f"{name}.parametrizations.weight.original1"] = v


def _resblock(out: Layout, p: str, ch: int, k: int, dilations: tuple[int, ...]) -> None:
    for group in ("convs1", "convs2"):
        for j in range(len(dilations)):
            _wn_conv(out, f"{p}{group}.{j}", ch, ch, k)
    for group in ("activations1", "activations2"):
        for j in range(len(dilations)):
            out[f"{p}{group}.{j}.alpha"] = (ch,)  # Snake alpha


def hift_layout(cfg: HiftConfig) -> Layout:
    out: Layout = {}
    _linear(out, "m_source.l_linear", 1, cfg.nb_harmonics + 1)
    base = cfg.base_channels
    _wn_conv(out, "conv_pre", base, cfg.in_channels, 7)
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        _wn_conv(out, f"ups.{i}", base // 2 ** (i + 1), base // 2**i, k, transposed=True)
    n_stft = cfg.istft_n_fft + 2  # real + imag of n_fft/2 + 1 bins
    cum = [1]
    for rate in reversed(cfg.upsample_rates[1:]):
        cum.append(cum[-1] * rate)
    for i, u in enumerate(reversed(cum)):
        ch = base // 2 ** (i + 1)
        _conv(out, f"source_downs.{i}", ch, n_stft, 1 if u == 1 else 2 * u)
    for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
        _resblock(out, f"source_resblocks.{i}.", base // 2 ** (i + 1), k, d)
    n_kernels = len(cfg.resblock_kernel_sizes)
    for i in range(len(cfg.upsample_rates)):
        for j, (k, d) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
            _resblock(out, f"resblocks.{i * n_kernels + j}.", base // 2 ** (i + 1), k, d)
    last_ch = base // 2 ** len(cfg.upsample_rates)
    _wn_conv(out, "conv_post", n_stft, last_ch, 7)
    cond = cfg.f0_cond_channels
    for j in range(5):  # condnet = 5 x (weight-normed Conv1d k3, ELU): indices 0, 2, 4, 6, 8
        _wn_conv(out, f"f0_predictor.condnet.{2 * j}", cond, cfg.in_channels if j == 0 else cond, 3)
    _linear(out, "f0_predictor.classifier", 1, cond)
    return out


# ---------------------------------------------------------------- all files


def expected_layout(cfg: ModelConfig) -> dict[str, Layout]:
    """For each released file name, every state-dict key -> shape (released naming, file order)."""
    return {"llm.pt": llm_layout(cfg.llm), "flow.pt": flow_layout(cfg.flow), "hift.pt": hift_layout(cfg.hift)}


def numel(layout: Layout) -> int:
    total = 0
    for shape in layout.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def unique_numel(file_name: str, layout: Layout) -> int:
    """Parameters stored once: llm.pt's lm_head is the same storage as embed_tokens."""
    total = numel(layout)
    if file_name == "llm.pt" and LM_HEAD_KEY in layout:
        total -= numel({LM_HEAD_KEY: layout[LM_HEAD_KEY]})
    return total


# ---------------------------------------------------------------- presets (dims only)


def full_config() -> ModelConfig:
    """The released CosyVoice2-0.5B dims (spec §2, Qwen2-0.5B config.json)."""
    qwen = QwenConfig(
        hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
        vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
    )
    return ModelConfig(llm=LLMConfig(qwen=qwen, llm_input_size=896), flow=FlowConfig(), hift=HiftConfig())


def tiny_config() -> ModelConfig:
    """The project's tiny test model: same dims as the shared reference tiny model."""
    qwen = QwenConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        vocab_size=704, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
    )
    flow = FlowConfig(
        encoder=EncoderConfig(output_size=512, attention_heads=8, linear_units=64, num_blocks=1),
        estimator=EstimatorConfig(channels=(64,), attention_head_dim=32, n_blocks=2, num_mid_blocks=2, num_heads=4),
    )
    hift = HiftConfig(base_channels=32, f0_cond_channels=32)
    return ModelConfig(llm=LLMConfig(qwen=qwen, llm_input_size=64), flow=flow, hift=hift)
