"""Server configuration: one frozen dataclass, filled from CLI flags over COSYSERVE_* env vars."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

# Weight dtype names (kernels.engine.weight_dtype maps them to torch dtypes; "auto": bf16 on CUDA, else fp32).
FLOW_DTYPES = ("fp32", "bf16", "fp16")
LLM_DTYPES = ("auto", *FLOW_DTYPES)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = pick a free port (tests)
    data_dir: Path = Path("./data")
    tokens: tuple[str, ...] = ()
    model_dir: Path | None = None  # None -> <data_dir>/tiny-model (random weights, loud warning)
    # Limits. Uploads are <= 30 s of audio: a 30 s 48 kHz stereo 24-bit WAV is ~8.6 MB, so 16 MiB is ample.
    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 16 * 1024  # total request-head size; h11 refuses beyond it (431)
    max_text_chars: int = 5000  # per request / per WS task (sum of continue-task pieces)
    max_ws_message_bytes: int = 1024 * 1024  # a continue-task text frame; larger -> close 1009
    header_timeout_s: float = 10.0  # slowloris guard: full request head must arrive within this
    idle_timeout_s: float = 30.0  # keep-alive connection with no request in flight is closed after this
    max_inflight: int = 256  # concurrent synthesis requests (HTTP + WS tasks) before 503
    shutdown_deadline_s: float = 10.0  # graceful drain: in-flight work gets this long, then is cancelled
    workers: int = 4  # thread pool for encoding, upload decoding and feature extraction
    voice_cache_size: int = 256  # VoicePrompts kept in memory
    retry_after_s: int = 1
    # Engine. max_batch = KV slots = requests decoding at once; 1 turns batching off (bench baseline).
    max_batch: int = 32
    device: str = ""  # "" = cuda when available, else cpu
    cuda_graphs: int = 1  # 0 disables decode CUDA graphs (debugging); ignored on CPU
    overlap_stages: int = 1  # flow/vocoder on a stage thread while the LLM decodes (0: one thread, serial)
    # CPU: torch intra-op threads of the engine (0 = torch's default, one per core). Small models
    # serve a lone request faster with 1 (their ops are too small to split); the 0.5B flow gains 1.7x from 2.
    threads: int = 0
    stage_workers: int = 0  # CPU: flow/vocoder of a batch split over this many 1-thread workers (0 = one per core)
    llm_dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    flow_dtype: str = "fp32"  # bf16: ~2x faster full-size flow on AVX512-BF16 CPUs, mel within ~3 %
    # Streaming flow caches of all requests together, MiB (-1 = half the RAM / a third of free GPU
    # memory; 0 = always recompute the flow over the whole prefix, as upstream does).
    flow_cache_mb: int = -1
    # Reference-audio store: "local" (data_dir: files + SQLite) or "s3" (one bucket shared by replicas).
    store: str = "local"
    s3_endpoint: str = ""  # e.g. http://127.0.0.1:8333 or https://oss-cn-hangzhou.aliyuncs.com; "" = AWS
    s3_bucket: str = ""
    s3_prefix: str = ""  # objects go under <prefix>/voices/
    s3_region: str = ""
    s3_addressing_style: str = "auto"  # path (most self-hosted servers) | virtual (OSS) | auto
    # Secrets: env only (COSYSERVE_S3_ACCESS_KEY / _SECRET_KEY), never a flag (visible in `ps`) or
    # the repr (logs). Empty = boto3's standard chain (AWS_ACCESS_KEY_ID, ~/.aws, instance role).
    s3_access_key: str = field(default="", repr=False)
    s3_secret_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        for name in ("max_body_bytes", "max_header_bytes", "max_text_chars", "max_ws_message_bytes",
                     "max_inflight", "workers", "voice_cache_size", "max_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("header_timeout_s", "idle_timeout_s", "shutdown_deadline_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.flow_cache_mb < -1:
            raise ValueError("flow_cache_mb must be >= -1 (-1 = automatic)")
        if self.threads < 0 or self.stage_workers < 0:
            raise ValueError("threads and stage_workers must be >= 0 (0 = automatic)")
        if self.llm_dtype not in LLM_DTYPES or self.flow_dtype not in FLOW_DTYPES:
            raise ValueError(f"llm_dtype auto|fp32|bf16|fp16, flow_dtype fp32|bf16|fp16: {self.llm_dtype!r}, {self.flow_dtype!r}")
        if any(not t for t in self.tokens):
            raise ValueError("empty token")
        if self.store not in ("local", "s3"):
            raise ValueError(f"store must be local or s3: {self.store!r}")
        if self.store == "s3" and not self.s3_bucket:
            raise ValueError("--store s3 needs --s3-bucket")
        if self.s3_addressing_style not in ("auto", "path", "virtual"):
            raise ValueError(f"s3_addressing_style must be auto, path or virtual: {self.s3_addressing_style!r}")


_ENV_PREFIX = "COSYSERVE_"


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="CosyVoice2 speech server")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--token", action="append", help="bearer token (repeatable); env COSYSERVE_TOKENS=a,b")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--max-text-chars", type=int)
    p.add_argument("--max-inflight", type=int)
    p.add_argument("--header-timeout-s", type=float)
    p.add_argument("--idle-timeout-s", type=float)
    p.add_argument("--shutdown-deadline-s", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--max-batch", type=int, help="requests decoding at once (1 = batching off)")
    p.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, help="CPU: engine intra-op threads (default: one per core)")
    p.add_argument("--stage-workers", type=int, help="CPU: 1-thread flow/vocoder workers (default: one per core)")
    p.add_argument("--llm-dtype", choices=LLM_DTYPES, help="LLM weights (auto: bf16 on CUDA)")
    p.add_argument("--flow-dtype", choices=FLOW_DTYPES, help="flow weights (default fp32)")
    p.add_argument("--flow-cache-mb", type=int, help="flow caches of all requests, MiB (-1 auto, 0 off)")
    p.add_argument("--cuda-graphs", type=int, choices=(0, 1), help="decode CUDA graphs on/off (default 1)")
    p.add_argument("--overlap-stages", type=int, choices=(0, 1),
                   help="flow/vocoder on a stage thread while the LLM decodes (default 1)")
    p.add_argument("--store", choices=("local", "s3"), help="reference-audio store (default local)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS for --s3-region)")
    p.add_argument("--s3-bucket")
    p.add_argument("--s3-prefix", help="key prefix inside the bucket (objects under <prefix>/voices/)")
    p.add_argument("--s3-region")
    p.add_argument("--s3-addressing-style", choices=("auto", "path", "virtual"))
    return p


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """CLI flags win over env vars (COSYSERVE_HOST, COSYSERVE_PORT, ..., COSYSERVE_TOKENS comma-separated)."""
    env = os.environ if env is None else env
    args = vars(_build_parser().parse_args(argv))
    types = {f.name: f.type for f in fields(ServerConfig)}
    values: dict[str, object] = {}
    for f in fields(ServerConfig):
        if f.name == "tokens":
            continue
        raw = env.get(_ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _coerce(str(types[f.name]), raw)
        if args.get(f.name) is not None:
            values[f.name] = args[f.name]
    tokens = args.get("token") or [t for t in env.get(_ENV_PREFIX + "TOKENS", "").split(",") if t]
    if not tokens:
        raise SystemExit("at least one --token (or COSYSERVE_TOKENS) is required")
    return ServerConfig(tokens=tuple(tokens), **values)  # type: ignore[arg-type]


def _coerce(type_name: str, raw: str) -> object:
    if "Path" in type_name:
        return Path(raw)
    if type_name.startswith("int"):
        return int(raw)
    if type_name.startswith("float"):
        return float(raw)
    return raw
