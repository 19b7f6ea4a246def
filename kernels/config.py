"""Model configuration read from a released CosyVoice2 model directory.

`cosyvoice2.yaml` is HyperPyYAML: its tags (`!new:`, `!name:`, `!apply:`, `!ref`) would
execute code if evaluated. We only read numbers from it: tagged nodes are loaded as plain
dicts (the tag kept under `__tag__`) and `!ref <key>` expressions are resolved against the
top-level keys, with `*`/`+` arithmetic on numbers. Qwen dimensions come from
`CosyVoice-BlankEN/config.json`.
"""
from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from frontend.model_files import QWEN_DIR, YAML_NAME


class ModelDirError(ValueError):
    """A model directory file is missing or malformed; the message names the file and key."""


@dataclass(frozen=True)
class QwenConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class LLMConfig:
    qwen: QwenConfig
    llm_input_size: int
    speech_token_size: int = 6561  # 3^8 FSQ codes; +3 outputs: eos 6561, 6562, fill 6563
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    min_token_text_ratio: float = 2.0
    max_token_text_ratio: float = 20.0
    mix_ratio: tuple[int, int] = (5, 15)

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 2

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.speech_token_size, self.speech_token_size + 1, self.speech_token_size + 2)

    @property
    def num_speech_outputs(self) -> int:
        return self.speech_token_size + 3


@dataclass(frozen=True)
class EncoderConfig:
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4  # hard-coded upstream
    static_chunk_size: int = 25


@dataclass(frozen=True)
class EstimatorConfig:
    in_channels: int = 320
    out_channels: int = 80
    channels: tuple[int, ...] = (256,)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    static_chunk_size: int = 50


@dataclass(frozen=True)
class FlowConfig:
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    encoder: EncoderConfig = EncoderConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10
    noise_frames: int = 15000  # fixed CFM noise buffer: manual_seed(0); randn(1, 80, 15000)


@dataclass(frozen=True)
class HiftConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512

    @property
    def samples_per_frame(self) -> int:
        total = self.istft_hop
        for rate in self.upsample_rates:
            total *= rate
        return total


@dataclass(frozen=True)
class ModelConfig:
    llm: LLMConfig
    flow: FlowConfig
    hift: HiftConfig
    sample_rate: int = 24000
    token_frame_rate: int = 25
    chunk_size: int = 25  # streaming chunk in tokens (must match training)

    @property
    def samples_per_token(self) -> int:
        return self.hift.samples_per_frame * self.flow.token_mel_ratio


# ---------------------------------------------------------------- yaml without execution


class _TagTolerantLoader(yaml.SafeLoader):
    """SafeLoader that turns every unknown tag into plain data instead of an error."""


def _construct_tagged(loader: yaml.Loader, tag_suffix: str, node: yaml.Node) -> Any:
    tag = node.tag
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
        return {"__tag__": tag, **value}
    if isinstance(node, yaml.SequenceNode):
        return {"__tag__": tag, "__args__": loader.construct_sequence(node, deep=True)}
    scalar = loader.construct_scalar(node)
    if tag == "!ref":
        return _Ref(str(scalar))
    return {"__tag__": tag, "__value__": scalar}


_TagTolerantLoader.add_multi_constructor("!", _construct_tagged)


@dataclass(frozen=True)
class _Ref:
    expr: str


_BINOPS = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub, ast.Div: operator.truediv}


def _eval_arith(expr: str) -> Any:
    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def _resolve(value: Any, top: dict[str, Any], depth: int = 0) -> Any:
    if depth > 20:
        raise ValueError("!ref nesting too deep")
    if isinstance(value, _Ref):
        text = value.expr.strip()
        whole = re.fullmatch(r"<([A-Za-z0-9_.]+)>", text)
        if whole:  # a plain reference may point at any value, not only numbers
            return _resolve(top.get(whole.group(1)), top, depth + 1)

        def sub(match: re.Match[str]) -> str:
            resolved = _resolve(top[match.group(1)], top, depth + 1)
            return repr(resolved)

        try:
            return _eval_arith(re.sub(r"<([A-Za-z0-9_.]+)>", sub, text))
        except (KeyError, ValueError, SyntaxError, TypeError):
            return text  # left unresolved: only sections we read must resolve
    if isinstance(value, dict):
        return {k: _resolve(v, top, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, depth + 1) for v in value]
    return value


def load_hyperpyyaml(path: Path) -> dict[str, Any]:
    """Read a HyperPyYAML file as data, resolving `!ref` arithmetic, executing nothing."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagTolerantLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise ModelDirError(f"{path.name}: cannot parse ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelDirError(f"{path.name}: top level is not a mapping")
    return {k: _resolve(v, raw) for k, v in raw.items()}


# ---------------------------------------------------------------- building the dataclasses


def _get(section: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    if key in section:
        return section[key]
    if default is not None:
        return default
    raise ModelDirError(f"{YAML_NAME}: missing key {where}.{key}")


def _section(top: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = top.get(key)
    if not isinstance(value, dict):
        raise ModelDirError(f"{YAML_NAME}: missing section {where}.{key}")
    return value


def read_qwen_config(model_dir: Path) -> QwenConfig:
    path = model_dir / QWEN_DIR / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{QWEN_DIR}/config.json: cannot read ({exc})") from exc
    try:
        return QwenConfig(
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg["num_key_value_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rope_theta=float(cfg.get("rope_theta", 1e6)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        )
    except KeyError as exc:
        raise ModelDirError(f"{QWEN_DIR}/config.json: missing key {exc.args[0]}") from exc


def _llm_config(top: dict[str, Any], qwen: QwenConfig) -> LLMConfig:
    llm = _section(top, "llm", "")
    sampling = llm.get("sampling", {}) if isinstance(llm.get("sampling"), dict) else {}
    mix = llm.get("mix_ratio", [5, 15])
    return LLMConfig(
        qwen=qwen,
        llm_input_size=int(_get(llm, "llm_input_size", "llm")),
        speech_token_size=int(_get(llm, "speech_token_size", "llm")),
        top_p=float(sampling.get("top_p", 0.8)),
        top_k=int(sampling.get("top_k", 25)),
        win_size=int(sampling.get("win_size", 10)),
        tau_r=float(sampling.get("tau_r", 0.1)),
        mix_ratio=(int(mix[0]), int(mix[1])),
    )


def _flow_config(top: dict[str, Any], chunk_size: int) -> FlowConfig:
    flow = _section(top, "flow", "")
    enc = _section(flow, "encoder", "flow")
    dec = _section(flow, "decoder", "flow")
    est = _section(dec, "estimator", "flow.decoder")
    cfm = dec.get("cfm_params", {})
    cfm = cfm.get("content", cfm) if isinstance(cfm, dict) else {}
    ratio = int(_get(flow, "token_mel_ratio", "flow", 2))
    encoder = EncoderConfig(
        output_size=int(_get(enc, "output_size", "flow.encoder")),
        attention_heads=int(_get(enc, "attention_heads", "flow.encoder")),
        linear_units=int(_get(enc, "linear_units", "flow.encoder")),
        num_blocks=int(_get(enc, "num_blocks", "flow.encoder")),
        static_chunk_size=int(enc.get("static_chunk_size") or chunk_size),
    )
    # The Dec-2024 release yaml uses ConditionalDecoder(causal: True) without chunk keys;
    # the newer CausalConditionalDecoder names static_chunk_size. Same weights either way.
    estimator = EstimatorConfig(
        in_channels=int(_get(est, "in_channels", "flow.decoder.estimator")),
        out_channels=int(_get(est, "out_channels", "flow.decoder.estimator")),
        channels=tuple(int(c) for c in _get(est, "channels", "flow.decoder.estimator")),
        attention_head_dim=int(_get(est, "attention_head_dim", "flow.decoder.estimator")),
        n_blocks=int(_get(est, "n_blocks", "flow.decoder.estimator")),
        num_mid_blocks=int(_get(est, "num_mid_blocks", "flow.decoder.estimator")),
        num_heads=int(_get(est, "num_heads", "flow.decoder.estimator")),
        static_chunk_size=int(est.get("static_chunk_size") or chunk_size * ratio),
    )
    return FlowConfig(
        input_size=int(_get(flow, "input_size", "flow")),
        output_size=int(_get(flow, "output_size", "flow")),
        spk_embed_dim=int(_get(flow, "spk_embed_dim", "flow", 192)),
        vocab_size=int(_get(flow, "vocab_size", "flow")),
        token_mel_ratio=ratio,
        pre_lookahead_len=int(_get(flow, "pre_lookahead_len", "flow", 3)),
        encoder=encoder,
        estimator=estimator,
        inference_cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)),
    )


def _hift_config(top: dict[str, Any]) -> HiftConfig:
    hift = _section(top, "hift", "")
    istft = hift.get("istft_params", {"n_fft": 16, "hop_len": 4})
    f0 = hift.get("f0_predictor", {})

    def ints(key: str) -> tuple[int, ...]:
        return tuple(int(v) for v in _get(hift, key, "hift"))

    def nested(key: str) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(v) for v in row) for row in _get(hift, key, "hift"))

    return HiftConfig(
        in_channels=int(_get(hift, "in_channels", "hift")),
        base_channels=int(_get(hift, "base_channels", "hift")),
        nb_harmonics=int(_get(hift, "nb_harmonics", "hift")),
        sampling_rate=int(_get(hift, "sampling_rate", "hift")),
        nsf_alpha=float(_get(hift, "nsf_alpha", "hift")),
        nsf_sigma=float(_get(hift, "nsf_sigma", "hift")),
        nsf_voiced_threshold=float(_get(hift, "nsf_voiced_threshold", "hift")),
        upsample_rates=ints("upsample_rates"),
        upsample_kernel_sizes=ints("upsample_kernel_sizes"),
        istft_n_fft=int(istft["n_fft"]),
        istft_hop=int(istft["hop_len"]),
        resblock_kernel_sizes=ints("resblock_kernel_sizes"),
        resblock_dilation_sizes=nested("resblock_dilation_sizes"),
        source_resblock_kernel_sizes=ints("source_resblock_kernel_sizes"),
        source_resblock_dilation_sizes=nested("source_resblock_dilation_sizes"),
        lrelu_slope=float(hift.get("lrelu_slope", 0.1)),
        audio_limit=float(hift.get("audio_limit", 0.99)),
        f0_cond_channels=int(f0.get("cond_channels", 512)) if isinstance(f0, dict) else 512,
    )


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse `cosyvoice2.yaml` and `CosyVoice-BlankEN/config.json` of a model directory."""
    model_dir = Path(model_dir)
    yaml_path = model_dir / YAML_NAME
    if not yaml_path.is_file():
        raise ModelDirError(f"{YAML_NAME}: not found in {model_dir}")
    top = load_hyperpyyaml(yaml_path)
    qwen = read_qwen_config(model_dir)
    chunk_size = int(top.get("chunk_size", 25))
    return ModelConfig(
        llm=_llm_config(top, qwen),
        flow=_flow_config(top, chunk_size),
        hift=_hift_config(top),
        sample_rate=int(top.get("sample_rate", 24000)),
        token_frame_rate=int(top.get("token_frame_rate", 25)),
        chunk_size=chunk_size,
    )
