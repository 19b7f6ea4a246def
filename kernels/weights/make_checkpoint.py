"""Write a RANDOM-WEIGHT CosyVoice2 model directory in the released layout.

    python -m kernels.weights.make_checkpoint --preset tiny --out DIR           # test model, a few seconds
    python -m kernels.weights.make_checkpoint --manifest manifest-0.5b.json --out DIR   # full 0.5B size

Shapes come from `kernels.weights.layout.expected_layout` (tiny) or the manifest's key -> shape list
(full size, cross-checked against expected_layout). Weights follow a recipe that keeps random
outputs numerically sane (no NaN, audio not stuck at the clamp), see `_draw`. Every tensor is
drawn from its own generator seeded by (seed, key), so output is deterministic and independent
of write order.

Large files are streamed: `torch.save` runs under `torch.serialization.skip_data` on untouched
`torch.empty` placeholders (no RAM is committed), then each storage's bytes are generated one
tensor at a time and written at their offset inside the zip; the zip CRCs are patched after.
Peak memory is about one tensor, not one file (llm.pt is 2.6 GB at full size).
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from kernels.config import ModelConfig
from kernels.weights.layout import (
    EMBED_TOKENS_KEY,
    LM_HEAD_KEY,
    Layout,
    expected_layout,
    full_config,
    tiny_config,
)
from kernels.weights.progress import progress

ASSETS = Path(__file__).parent / "assets"
CORPUS = ASSETS / "corpus_zh_en.txt"
BPE_VOCAB = 640  # byte-level BPE size of the tiny tokenizer; specials follow at 640, 641, 642
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CAMPPLUS_HIDDEN = 64
QWEN2_SPLIT = (  # the Qwen2 pre-tokenizer pattern (GPT-4 style, single digits)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ---------------------------------------------------------------- weight recipe


@dataclass(frozen=True)
class Recipe:
    seed: int
    hift_upsample_rates: tuple[int, ...]
    salt: str = ""  # distinguishes the BlankEN copy from llm.pt

    def generator(self, key: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32((self.salt + key).encode()))


def _fan_in(key: str, shape: tuple[int, ...], recipe: Recipe) -> float:
    if key.startswith("ups.") and key.endswith("original1"):  # ConvTranspose1d weight [in, out, k]
        stride = recipe.hift_upsample_rates[int(key.split(".")[1])]
        return shape[0] * shape[2] / stride
    return float(math.prod(shape[1:]))


def _gain(key: str) -> float:
    if key.startswith("llm_decoder."):
        return 3.0  # sharper speech-token distributions
    if key.startswith("conv_post."):
        return 0.15  # keeps HiFT magnitudes small: few samples hit the 0.99 clamp
    return 1.0


def _draw(key: str, shape: tuple[int, ...], recipe: Recipe) -> torch.Tensor:
    gen = recipe.generator(key)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key == "f0_predictor.classifier.bias":
        return x.mul_(5.0).add_(120.0)  # f0 ~ 120 Hz: most frames voiced (> 10 Hz)
    if key == "f0_predictor.classifier.weight":
        return x.mul_(20.0 / math.sqrt(shape[1]))
    if key.endswith(".alpha"):
        return x.mul_(0.2).exp_()  # Snake alpha ~ exp(N(0, 0.2^2))
    if key.endswith(".bias") or ".pos_bias_" in key:
        return x.mul_(0.02)
    if len(shape) == 1:
        return x.mul_(0.1).add_(1.0)  # LayerNorm / RMSNorm weights ~ 1
    return x.mul_(_gain(key) / math.sqrt(_fan_in(key, shape, recipe)))


def _tensor_fn(layout: Layout, recipe: Recipe) -> Callable[[str], torch.Tensor]:
    def make(key: str) -> torch.Tensor:
        if key.endswith(".parametrizations.weight.original0"):
            v_key = key[: -len("original0")] + "original1"
            v = _draw(v_key, layout[v_key], recipe)
            return v.flatten(1).norm(dim=1).reshape(layout[key])  # g = |v|: the folded weight is v
        return _draw(key, layout[key], recipe)

    return make


# ---------------------------------------------------------------- streamed torch.save


def _local_data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """zip member name -> (offset of its data, offset of its local header) for a STORED zip."""
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.header_offset)
    return out


def _patch_crcs(path: Path, crcs: dict[str, int], headers: dict[str, int]) -> None:
    """Write the real CRC-32s into the local headers and the central directory."""
    with open(path, "r+b") as f:
        for name, crc in crcs.items():
            f.seek(headers[name] + 14)
            f.write(struct.pack("<I", crc))
        size = f.seek(0, 2)
        f.seek(max(0, size - 65_536))
        tail = f.read()
        eocd = tail.rfind(b"PK\x05\x06")
        _n_entries, _cd_size, cd_offset = struct.unpack("<HII", tail[eocd + 10 : eocd + 20])
        if cd_offset == 0xFFFFFFFF:  # zip64: central directory offset lives in the zip64 EOCD record
            loc = tail.rfind(b"PK\x06\x07")
            (z64_eocd,) = struct.unpack("<Q", tail[loc + 8 : loc + 16])
            f.seek(z64_eocd + 48)
            (cd_offset,) = struct.unpack("<Q", f.read(8))
        f.seek(cd_offset)
        pos = cd_offset
        while True:
            f.seek(pos)
            head = f.read(46)
            if head[:4] != b"PK\x01\x02":
                break
            name_len, extra_len, comment_len = struct.unpack("<HHH", head[28:34])
            name = f.read(name_len).decode()
            if name in crcs:
                f.seek(pos + 16)
                f.write(struct.pack("<I", crcs[name]))
            pos += 46 + name_len + extra_len + comment_len


def save_streamed(path: Path, layout: Layout, make: Callable[[str], torch.Tensor], tied: dict[str, str]) -> int:
    """torch.save-compatible file of `layout`, filled tensor by tensor. `tied` maps alias -> source
    key: the alias is the same tensor (one storage in the file). Returns bytes written."""
    placeholders: dict[str, torch.Tensor] = {}
    for key, shape in layout.items():
        placeholders[key] = placeholders[tied[key]] if key in tied else torch.empty(shape, dtype=torch.float32)
    with torch.serialization.skip_data():
        torch.save(placeholders, path)
    offsets = _local_data_offsets(path)
    prefix = next(iter(offsets)).split("/")[0]
    owners = [k for k in layout if k not in tied]  # storage keys 0, 1, ... in pickling order
    crcs, headers = {}, {}
    with open(path, "r+b") as f:
        for index, key in enumerate(owners):
            name = f"{prefix}/data/{index}"
            value = make(key).contiguous()
            assert tuple(value.shape) == tuple(layout[key]), key
            data = memoryview(value.numpy()).cast("B")
            f.seek(offsets[name][0])
            f.write(data)
            crcs[name], headers[name] = zlib.crc32(data), offsets[name][1]
            del value, data
    _patch_crcs(path, crcs, headers)
    return path.stat().st_size


def save_safetensors_streamed(path: Path, layout: Layout, make: Callable[[str], torch.Tensor]) -> int:
    """A safetensors file (8-byte header length, JSON header, raw little-endian data), streamed."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in layout.items():
        nbytes = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in layout:
            f.write(memoryview(make(key).contiguous().numpy()).cast("B"))
    return path.stat().st_size


# ---------------------------------------------------------------- config files


def qwen_config_json(cfg: ModelConfig, eos_id: int) -> dict[str, object]:
    q = cfg.llm.qwen
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": q.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": q.intermediate_size,
        "max_position_embeddings": q.max_position_embeddings,
        "max_window_layers": q.num_layers,
        "model_type": "qwen2",
        "num_attention_heads": q.num_heads,
        "num_hidden_layers": q.num_layers,
        "num_key_value_heads": q.num_kv_heads,
        "rms_norm_eps": q.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": q.rope_theta,
        "sliding_window": q.max_position_embeddings,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": q.vocab_size,
    }


def tokenizer_config_json(first_special: int) -> dict[str, object]:
    decoder = {
        str(first_special + i): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
        }
        for i, tok in enumerate(SPECIALS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIALS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": SPECIALS[0],
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": SPECIALS[0],
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def train_tokenizer(out_dir: Path) -> int:
    """Byte-level BPE (Qwen2 split regex + NFC) on the shipped corpus -> vocab.json, merges.txt."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train([str(CORPUS)], trainer)
    tok.model.save(str(out_dir))
    size = tok.get_vocab_size()
    if size != BPE_VOCAB:
        raise RuntimeError(f"corpus too small: BPE reached {size} tokens, want {BPE_VOCAB}")
    return size


def _yaml_list(values: tuple[object, ...]) -> str:
    return "[" + ", ".join(_yaml_list(v) if isinstance(v, tuple) else str(v) for v in values) + "]"


def cosyvoice2_yaml(cfg: ModelConfig, legacy: bool = False) -> str:
    """The upstream yaml's inference sections with `cfg`'s numbers. `legacy` writes the Dec-2024
    release generation (ConditionalDecoder causal: True, no chunk keys); same weights either way."""
    enc, est, hift = cfg.flow.encoder, cfg.flow.estimator, cfg.hift
    enc_chunk = "" if legacy else "        static_chunk_size: !ref <chunk_size>\n"
    if legacy:
        est_head = "        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder\n"
        est_tail = ""
        est_causal = "            causal: True\n"
    else:
        est_head = "        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder\n"
        est_tail = (
            "            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>\n"
            "            num_decoding_left_chunks: !ref <num_decoding_left_chunks>\n"
        )
        est_causal = ""
    return f"""\
# ======================================================================================
# RANDOM WEIGHTS -- NOT A REAL VOICE MODEL. Written by `python -m kernels.weights.make_checkpoint`.
# Dimensions only; every weight in llm.pt / flow.pt / hift.pt / *.onnx is random noise.
# ======================================================================================
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

sample_rate: {cfg.sample_rate}
llm_input_size: {cfg.llm.llm_input_size}
llm_output_size: {cfg.llm.qwen.hidden_size}
spk_embed_dim: {cfg.flow.spk_embed_dim}
qwen_pretrain_path: ''
token_frame_rate: {cfg.token_frame_rate}
token_mel_ratio: {cfg.flow.token_mel_ratio}
chunk_size: {cfg.chunk_size}
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {cfg.llm.speech_token_size}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: {_yaml_list(cfg.llm.mix_ratio)}
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: {cfg.llm.top_p}
        top_k: {cfg.llm.top_k}
        win_size: {cfg.llm.win_size}
        tau_r: {cfg.llm.tau_r}

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {cfg.flow.input_size}
    output_size: {cfg.flow.output_size}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {cfg.flow.vocab_size}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: {cfg.flow.pre_lookahead_len}
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {enc.output_size}
        attention_heads: {enc.attention_heads}
        linear_units: {enc.linear_units}
        num_blocks: {enc.num_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {cfg.flow.input_size}
        use_cnn_module: False
        macaron_style: False
{enc_chunk}    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: {cfg.flow.inference_cfg_rate}
                reg_loss_type: 'l1'
{est_head}            in_channels: {est.in_channels}
            out_channels: {est.out_channels}
{est_causal}            channels: {_yaml_list(est.channels)}
            dropout: 0.0
            attention_head_dim: {est.attention_head_dim}
            n_blocks: {est.n_blocks}
            num_mid_blocks: {est.num_mid_blocks}
            num_heads: {est.num_heads}
            act_fn: 'gelu'
{est_tail}
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: {hift.in_channels}
    base_channels: {hift.base_channels}
    nb_harmonics: {hift.nb_harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {hift.nsf_alpha}
    nsf_sigma: {hift.nsf_sigma}
    nsf_voiced_threshold: {hift.nsf_voiced_threshold:g}
    upsample_rates: {_yaml_list(hift.upsample_rates)}
    upsample_kernel_sizes: {_yaml_list(hift.upsample_kernel_sizes)}
    istft_params:
        n_fft: {hift.istft_n_fft}
        hop_len: {hift.istft_hop}
    resblock_kernel_sizes: {_yaml_list(hift.resblock_kernel_sizes)}
    resblock_dilation_sizes: {_yaml_list(hift.resblock_dilation_sizes)}
    source_resblock_kernel_sizes: {_yaml_list(hift.source_resblock_kernel_sizes)}
    source_resblock_dilation_sizes: {_yaml_list(hift.source_resblock_dilation_sizes)}
    lrelu_slope: {hift.lrelu_slope}
    audio_limit: {hift.audio_limit}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: {hift.in_channels}
        cond_channels: {hift.f0_cond_channels}

get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""


# ---------------------------------------------------------------- ONNX stand-ins


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float):  # -> TensorProto
    from onnx import numpy_helper

    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _save_onnx(graph, path: Path) -> None:  # type: ignore[no-untyped-def]
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kernels.weights.make_checkpoint")
    model.ir_version = 8  # readable by older onnxruntime builds too
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def campplus_onnx(path: Path, seed: int, hidden: int = CAMPPLUS_HIDDEN) -> None:
    """input f32 [B,T,80] -> output f32 [B,192]: mean + rms over T -> Linear -> tanh -> Linear."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng([seed, 1])
    inits = [
        _init(rng, "w1", (160, hidden), 1 / math.sqrt(160)),
        _init(rng, "b1", (hidden,), 0.02),
        _init(rng, "w2", (hidden, 192), 1 / math.sqrt(hidden)),
        _init(rng, "b2", (192,), 0.02),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["input", "input"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["msq"], axes=[1], keepdims=0),
        helper.make_node("Sqrt", ["msq"], ["rms"]),
        helper.make_node("Concat", ["mean", "rms"], ["stats"], axis=1),
        helper.make_node("MatMul", ["stats", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 192])],
        inits,
    )
    _save_onnx(graph, path)


def speech_tokenizer_onnx(path: Path, seed: int) -> None:
    """feats f32 [B,128,T], feats_length i32 [B] -> indices i32 [B, ceil(max(len)/4)]:
    Conv(k4, s4, end pad 3) -> tanh -> round -> {0,1,2}^8 -> base-3 index (3^8 = 6561 codes)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng([seed, 2])
    inits = [
        _init(rng, "conv_w", (8, 128, 4), 3.0 / math.sqrt(128 * 4)),
        _init(rng, "conv_b", (8,), 0.02),
        numpy_helper.from_array(np.ones((), np.float32), "one"),
        numpy_helper.from_array((3.0 ** np.arange(8)).astype(np.float32).reshape(1, 8, 1), "powers"),
        numpy_helper.from_array(np.array(3, np.int32), "three"),
        numpy_helper.from_array(np.array(4, np.int32), "four"),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Conv", ["feats", "conv_w", "conv_b"], ["c"], kernel_shape=[4], strides=[4], pads=[0, 3]),
        helper.make_node("Tanh", ["c"], ["t"]),
        helper.make_node("Round", ["t"], ["r"]),
        helper.make_node("Add", ["r", "one"], ["digits"]),  # {-1, 0, 1} -> {0, 1, 2}
        helper.make_node("Mul", ["digits", "powers"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axis1"], ["code"], keepdims=0),
        helper.make_node("Cast", ["code"], ["codes"], to=TensorProto.INT32),
        helper.make_node("ReduceMax", ["feats_length"], ["max_len"], keepdims=1),
        helper.make_node("Add", ["max_len", "three"], ["len3"]),
        helper.make_node("Div", ["len3", "four"], ["n_tok32"]),  # integer division: ceil(len / 4)
        helper.make_node("Cast", ["n_tok32"], ["n_tok"], to=TensorProto.INT64),
        helper.make_node("Slice", ["codes", "start", "n_tok", "axis1"], ["indices"]),
    ]
    graph = helper.make_graph(
        nodes,
        "speech_tokenizer_standin",
        [
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["B", 128, "T"]),
            helper.make_tensor_value_info("feats_length", TensorProto.INT32, ["B"]),
        ],
        [helper.make_tensor_value_info("indices", TensorProto.INT32, ["B", "N"])],
        inits,
    )
    _save_onnx(graph, path)


# ---------------------------------------------------------------- the whole directory


def blank_qwen_layout(llm_layout: Layout) -> Layout:
    """HF Qwen2ForCausalLM keys (tied lm_head not stored) from llm.pt's `llm.model.model.*`."""
    prefix = "llm.model."
    return {k[len(prefix):]: s for k, s in llm_layout.items() if k.startswith(prefix + "model.")}


def write_model_dir(out: Path, cfg: ModelConfig, layout: dict[str, Layout], seed: int, legacy_yaml: bool = False,
                    log: Callable[[str], None] | None = None, progress_file: IO[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    qwen_dir = out / "CosyVoice-BlankEN"
    qwen_dir.mkdir(exist_ok=True)
    recipe = Recipe(seed=seed, hift_upsample_rates=cfg.hift.upsample_rates)
    blank = blank_qwen_layout(layout["llm.pt"])
    total = sum(math.prod(s) for lay in (*layout.values(), blank) for k, s in lay.items() if k != LM_HEAD_KEY)
    with progress(total, "random weights", unit="param", unit_scale=True, file=progress_file) as bar:
        _write_model_dir(out, cfg, layout, recipe, legacy_yaml, log or bar.write, _counted(bar))


def _counted(bar: Any) -> Callable[[Callable[[str], torch.Tensor]], Callable[[str], torch.Tensor]]:
    """Wrap a tensor maker so the bar advances by each tensor's size."""
    def wrap(make: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
        def counted(key: str) -> torch.Tensor:
            value = make(key)
            bar.update(value.numel())
            return value
        return counted
    return wrap


def _write_model_dir(out: Path, cfg: ModelConfig, layout: dict[str, Layout], recipe: Recipe, legacy_yaml: bool,
                     log: Callable[[str], None], counted: Callable[..., Callable[[str], torch.Tensor]]) -> None:
    qwen_dir = out / "CosyVoice-BlankEN"
    seed = recipe.seed

    def wrote(name: str, n_bytes: int, params: int | None = None, t0: float | None = None) -> None:
        extra = f", {params:,} params" if params is not None else ""
        took = f", {time.perf_counter() - t0:.1f} s" if t0 is not None else ""
        log(f"wrote {name}: {n_bytes:,} bytes{extra}{took}")

    (out / "cosyvoice2.yaml").write_text(cosyvoice2_yaml(cfg, legacy_yaml), encoding="utf-8")
    wrote("cosyvoice2.yaml", (out / "cosyvoice2.yaml").stat().st_size)
    for file_name, lay in layout.items():
        t0 = time.perf_counter()
        tied = {LM_HEAD_KEY: EMBED_TOKENS_KEY} if file_name == "llm.pt" and LM_HEAD_KEY in lay else {}
        size = save_streamed(out / file_name, lay, counted(_tensor_fn(lay, recipe)), tied)
        unique = sum(math.prod(s) for k, s in lay.items() if k not in tied)
        wrote(file_name, size, unique, t0)
    campplus_onnx(out / "campplus.onnx", seed)
    speech_tokenizer_onnx(out / "speech_tokenizer_v2.onnx", seed)
    wrote("campplus.onnx", (out / "campplus.onnx").stat().st_size)
    wrote("speech_tokenizer_v2.onnx", (out / "speech_tokenizer_v2.onnx").stat().st_size)
    write_blank_en(qwen_dir, cfg, layout["llm.pt"], Recipe(seed, cfg.hift.upsample_rates, salt="blank:"), wrote,
                   counted)


def write_blank_en(qwen_dir: Path, cfg: ModelConfig, llm_layout: Layout, recipe: Recipe,
                   wrote: Callable[..., None], counted: Callable[..., Callable[[str], torch.Tensor]] = lambda m: m
                   ) -> None:
    n_bpe = train_tokenizer(qwen_dir)
    if cfg.llm.qwen.vocab_size < n_bpe + len(SPECIALS):
        raise ValueError(f"Qwen vocab_size {cfg.llm.qwen.vocab_size} < tokenizer size {n_bpe + len(SPECIALS)}")
    files = {
        "config.json": qwen_config_json(cfg, eos_id=n_bpe),
        "generation_config.json": {"_from_model_config": True, "bos_token_id": n_bpe, "eos_token_id": n_bpe},
        "tokenizer_config.json": tokenizer_config_json(n_bpe),
    }
    for name, obj in files.items():
        (qwen_dir / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    blank = blank_qwen_layout(llm_layout)
    size = save_safetensors_streamed(qwen_dir / "model.safetensors", blank, counted(_tensor_fn(blank, recipe)))
    wrote("CosyVoice-BlankEN/model.safetensors", size, sum(math.prod(s) for s in blank.values()), t0)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        wrote(f"CosyVoice-BlankEN/{name}", (qwen_dir / name).stat().st_size)


def layout_from_manifest(path: Path) -> tuple[ModelConfig, dict[str, Layout]]:
    """Full-size config + the manifest's key -> shape lists (must agree with expected_layout)."""
    manifest = json.loads(path.read_text(encoding="utf-8"))
    layout = {f: {k: tuple(v["shape"]) for k, v in m["keys"].items()} for f, m in manifest["files"].items()}
    cfg = full_config()
    q = manifest.get("qwen2_config", {})
    mismatch = {k: v for k, v in (("hidden_size", cfg.llm.qwen.hidden_size), ("vocab_size", cfg.llm.qwen.vocab_size),
                                  ("num_hidden_layers", cfg.llm.qwen.num_layers)) if q.get(k, v) != v}
    if mismatch or layout != expected_layout(cfg):
        raise ValueError(f"{path.name}: does not describe the released 0.5B layout ({mismatch or 'keys/shapes differ'})")
    return cfg, layout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=["tiny", "full"], help="dims: tiny test model or the full 0.5B")
    source.add_argument("--manifest", type=Path, help="manifest-0.5b.json: full-size key -> shape list")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--legacy-yaml", action="store_true", help="Dec-2024 yaml (ConditionalDecoder causal)")
    args = parser.parse_args(argv)
    if args.manifest is not None:
        cfg, layout = layout_from_manifest(args.manifest)
    else:
        cfg = tiny_config() if args.preset == "tiny" else full_config()
        layout = expected_layout(cfg)
    t0 = time.perf_counter()
    write_model_dir(args.out, cfg, layout, args.seed, legacy_yaml=args.legacy_yaml)
    total = sum(math.prod(s) for f, lay in layout.items() for k, s in lay.items() if k != LM_HEAD_KEY)
    print(f"RANDOM WEIGHTS model in {args.out}: {total:,} unique params in llm/flow/hift, "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
