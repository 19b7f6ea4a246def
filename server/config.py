"""Server configuration: one frozen dataclass, filled from CLI flags over COSYSERVE_* env vars.

Each field's help text lives in its metadata; the CLI is generated from the fields, so every flag
has a help line that shows its default and its environment variable.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from protocol.schema import DEFAULT_MAX_TEXT_CHARS
from protocol.websocket import DEFAULT_MAX_MESSAGE_BYTES
from server.log_lines import LOG_FORMATS

# Weight dtype names (kernels.runtime.engine.weight_dtype maps them to torch dtypes; "auto": bf16 on CUDA, else fp32).
WEIGHT_DTYPES = ("fp32", "bf16", "fp16")
LLM_DTYPES = FLOW_DTYPES = ("auto", *WEIGHT_DTYPES)
ENV_PREFIX = "COSYSERVE_"
ROLES = ("all", "frontend", "backend")


def _doc(help: str, choices: Sequence[Any] | None = None, env_only: bool = False,
         flag: str | None = None) -> dict[str, Any]:
    """A field's CLI metadata: help, choices, `env_only` (secrets: never a flag), flag name if not its own."""
    return {"help": help, "choices": choices, "env_only": env_only, "flag": flag}


@dataclass(frozen=True)
class ServerConfig:
    role: str = field(default="all", metadata=_doc(
        "all: one process (API + engine); frontend: the public API, jobs go to --backend (never loads "
        "torch); backend: the engine behind the internal API (/internal/v1/*, --internal-token)",
        choices=ROLES))
    internal_token: str = field(default="", repr=False, metadata=_doc(
        "bearer token of the internal API between frontends and backends (required by both roles)"))
    backends: tuple[str, ...] = field(default=(), metadata=_doc(
        "frontend: a backend's base URL, e.g. http://10.0.0.5:8001 (repeat the flag for several; env: "
        "comma-separated)", flag="backend"))
    backend_dns: str = field(default="", metadata=_doc(
        "frontend: backends from DNS, name:port (A/AAAA records, e.g. a Kubernetes headless Service), "
        "re-resolved every --backend-check-s; with or instead of --backend"))
    backend_check_s: float = field(default=2.0, metadata=_doc(
        "frontend: health check of each backend (GET /internal/v1/health) and DNS re-resolution, every "
        "this many seconds"))
    backend_eject_after: int = field(default=3, metadata=_doc(
        "frontend: consecutive failures (refused, reset, 503) that eject a backend until its health check "
        "answers 200 again"))
    host: str = field(default="127.0.0.1", metadata=_doc(
        "address to listen on (0.0.0.0: every interface)"))
    port: int = field(default=8000, metadata=_doc(
        "port to listen on (0: a free port)"))
    data_dir: Path = field(default=Path("./data"), metadata=_doc(
        "voices (files + SQLite) and the generated tiny model live here"))
    tokens: tuple[str, ...] = field(default=(), repr=False, metadata=_doc(
        "bearer token clients must send (repeat the flag for several; env: comma-separated)", flag="token"))
    model_dir: Path | None = field(default=None, metadata=_doc(
        "the released CosyVoice2-0.5B directory; unset: a tiny model with RANDOM weights is generated "
        "under --data-dir (noise, not speech)"))
    # Uploads are <= 30 s of audio: a 30 s 48 kHz stereo 24-bit WAV is ~8.6 MB, so 16 MiB is ample.
    # The one default of both HTTP limits: protocol.http.HttpConnection takes them from here.
    max_body_bytes: int = field(default=16 * 1024 * 1024, metadata=_doc(
        "largest request body (an upload), bytes; 413 beyond"))
    max_header_bytes: int = field(default=16 * 1024, metadata=_doc(
        "largest request head, bytes; 431 beyond"))
    max_text_chars: int = field(default=DEFAULT_MAX_TEXT_CHARS, metadata=_doc(
        "longest text per request / per WebSocket task (all pieces), characters"))
    max_ws_message_bytes: int = field(default=DEFAULT_MAX_MESSAGE_BYTES, metadata=_doc(
        "largest WebSocket message, bytes; close 1009 beyond"))
    header_timeout_s: float = field(default=10.0, metadata=_doc(
        "a request head must arrive within this (slowloris guard), seconds"))
    idle_timeout_s: float = field(default=30.0, metadata=_doc(
        "a keep-alive connection with nothing in flight closes after this, s"))
    # Uploads are the only large bodies: 60 s carries the 16 MiB limit at ~2.2 Mbit/s, a real 30 s
    # voice (~1 MB WAV) at ~140 kbit/s; bytes trickled slower than that hold a socket for nothing.
    body_timeout_s: float = field(default=60.0, metadata=_doc(
        "a request body must arrive within this of its head, however it trickles (slow uploads); 408 "
        "beyond, seconds"))
    # A listener reads audio at least in real time (48 kB/s of 24 kHz PCM); one that drains nothing of a
    # full write buffer for 30 s has stopped reading, and its job, queued audio and socket are freed.
    stalled_write_timeout_s: float = field(default=30.0, metadata=_doc(
        "a response (SSE, WebSocket, any) whose full write buffer drains nothing for this long is cut: "
        "its engine job cancelled, the connection closed, seconds"))
    # Under the usual 1024 open-file limit, so an excess client gets a 503 instead of accept() failing
    # (EMFILE); raise it with `ulimit -n`. Each connection holds at most ~100 KiB of buffers.
    max_connections: int = field(default=1000, metadata=_doc(
        "open client connections (HTTP keep-alive and WebSocket); beyond it a new one is answered 503 "
        "+ Retry-After and closed"))
    # A client library pings every few seconds at most; a browser never does. Pongs cost a write each.
    ws_max_pings_per_s: float = field(default=10.0, metadata=_doc(
        "WebSocket pings a client may send per second (bursts of as many allowed); a flood beyond "
        "closes with 1008"))
    max_inflight: int = field(default=256, metadata=_doc(
        "concurrent synthesis requests (HTTP + WebSocket tasks); 429 beyond"))
    shutdown_deadline_s: float = field(default=10.0, metadata=_doc(
        "on SIGTERM, in-flight work gets this long, then is cancelled, s"))
    workers: int = field(default=4, metadata=_doc(
        "thread pool for audio encoding, upload decoding and feature extraction"))
    voice_cache_size: int = field(default=256, metadata=_doc(
        "reference voices kept in memory"))
    retry_after_s: int = field(default=1, metadata=_doc(
        "Retry-After seconds on 429/503"))
    # Engine.
    max_batch: int = field(default=32, metadata=_doc(
        "requests decoding at once (KV slots); 1 = batching off, one request at a time end to end "
        "(the benchmark baseline)"))
    device: str = field(default="", metadata=_doc(
        "torch device: cuda, cuda:1, cpu (unset: cuda when available, else cpu)"))
    cuda_graphs: int = field(default=1, metadata=_doc(
        "CUDA: capture the LLM decode in CUDA graphs (0: eager, for debugging)", choices=(0, 1)))
    overlap_stages: str = field(default="auto", metadata=_doc(
        "flow/vocoder on a stage thread while the LLM decodes (auto: on with 2+ cores or CUDA; 0: one "
        "thread does both in turn)", choices=("auto", "0", "1")))
    threads: int = field(default=0, metadata=_doc(
        "CPU: engine intra-op threads (0 = auto: 1 for small models such as the tiny one, whose ops "
        "are too small to split; one per core for the 0.5B)"))
    stage_workers: int = field(default=0, metadata=_doc(
        "CPU: flow/vocoder of a batch split over this many 1-thread workers (0 = auto: one per core)"))
    llm_dtype: str = field(default="auto", metadata=_doc(
        "LLM weights (auto: bf16 on CUDA; on CPU bf16 for the full-size model where the CPU has "
        "AVX512-BF16 or AMX, else fp32; logged at start)", choices=LLM_DTYPES))
    flow_dtype: str = field(default="auto", metadata=_doc(
        "flow weights (auto: fp32 on CUDA; on CPU as --llm-dtype auto). bf16: ~2x faster full-size flow on "
        "AVX512-BF16 CPUs, mel within ~1 % of fp32", choices=FLOW_DTYPES))
    flow_steps: int = field(default=0, metadata=_doc(
        "Euler steps of the flow's ODE (0: upstream's 10). Opt-in: 5 halves the flow's time (the most "
        "of the CPU's) and changes the mel; see the README's CPU section for the measured difference"))
    first_chunk_tokens: int = field(default=-1, metadata=_doc(
        "streaming: the first audio chunk covers this many speech tokens (40 ms each) instead of upstream's "
        "25 (+ the prompt's pad to the 25-token grid), so the first audio needs N+3 generated tokens instead "
        "of 28; the second chunk completes the grid chunk, later ones are upstream's. Opt-in: the first "
        "chunk's frames come from an incomplete flow chunk (README CPU section). -1: off, or the preset's; "
        "0: off"))
    preset: str = field(default="none", metadata=_doc(
        "cpu-fast: --flow-steps 5, --first-chunk-tokens 10 (unless given) and, for the full-size model, "
        "--llm-int8 1 on a CPU: the opt-in speed options whose numerics move (README CPU section); ignored "
        "on a GPU",
        choices=("none", "cpu-fast")))
    llm_int8: int = field(default=0, metadata=_doc(
        "CPU: the LLM's decoder layers also get int8 weights (per channel) for decode steps of up to 8 "
        "requests (4 beside packed bf16 weights), fed bf16 activations (an fp32 LLM's too): ~1.8x faster "
        "one-request decode (bf16 LLM), ~3x (fp32 LLM); opt-in, numerics move (README CPU section)",
        choices=(0, 1)))
    packed_linears: int = field(default=1, metadata=_doc(
        "CPU: run the flow's linears, and the full-size LLM's, on weights packed once for oneDNN at start-up: "
        "the same numbers, faster (bf16 1.05-1.45x, fp32 ~2x per matmul on an AMD Zen 4; README CPU section); "
        "0: torch's linears", choices=(0, 1)))
    flow_cache_mb: int = field(default=-1, metadata=_doc(
        "streaming flow caches of all requests together, MiB (-1: half the RAM or a third of free GPU "
        "memory; 0: recompute the prefix, as upstream)"))
    voice_prefix_mb: int = field(default=1024, metadata=_doc(
        "streaming: a voice's prompt frames through the flow, computed once and reused by its later streams "
        "(the first chunk then skips most of the prompt); an LRU of this many MiB (0: off)"))
    heap_trim_s: float = field(default=60.0, metadata=_doc(
        "CPU: give the heap's free pages back to the kernel at most this often under load, and once when "
        "the engine falls idle (0: never; RSS then creeps up as step activations fragment the heap)"))
    text_process: int = field(default=1, metadata=_doc(
        "normalise request text in a child process (0: on the worker threads, where its pure-Python work "
        "holds the GIL and slows every running stream; see bench.stall)", choices=(0, 1)))
    log_format: str = field(default="text", metadata=_doc(
        "log lines: text (for people) or json (one object a line: time, level, logger, message, request_id, "
        "extra fields)", choices=LOG_FORMATS))
    warmup: int = field(default=1, metadata=_doc(
        "run two short syntheses before listening, so the first request does not pay one-time costs", choices=(0, 1)))
    # Reference-audio store.
    store: str = field(default="local", metadata=_doc(
        "reference-audio store: local (--data-dir: files + SQLite) or s3 (one bucket shared by "
        "replicas)", choices=("local", "s3")))
    s3_endpoint: str = field(default="", metadata=_doc(
        "S3-compatible endpoint URL, e.g. http://127.0.0.1:8333 or "
        "https://oss-cn-hangzhou.aliyuncs.com (unset: AWS)"))
    s3_bucket: str = field(default="", metadata=_doc(
        "bucket (required with --store s3)"))
    s3_prefix: str = field(default="", metadata=_doc(
        "key prefix inside the bucket (objects go under <prefix>/voices/)"))
    s3_region: str = field(default="", metadata=_doc(
        "bucket region"))
    s3_addressing_style: str = field(default="auto", metadata=_doc(
        "path (most self-hosted servers) | virtual (OSS) | auto", choices=("auto", "path", "virtual")))
    # Secrets: env only (never a flag, visible in `ps`, nor the repr, in logs). Empty = boto3's
    # standard chain (AWS_ACCESS_KEY_ID, ~/.aws, instance role).
    s3_access_key: str = field(default="", repr=False, metadata=_doc(
        "S3 access key", env_only=True))
    s3_secret_key: str = field(default="", repr=False, metadata=_doc(
        "S3 secret key", env_only=True))

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        for name in ("max_body_bytes", "max_header_bytes", "max_text_chars", "max_ws_message_bytes",
                     "max_inflight", "workers", "voice_cache_size", "max_batch", "max_connections"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("header_timeout_s", "idle_timeout_s", "shutdown_deadline_s", "body_timeout_s",
                     "stalled_write_timeout_s", "ws_max_pings_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.flow_cache_mb < -1:
            raise ValueError("flow_cache_mb must be >= -1 (-1 = automatic)")
        if self.flow_steps < 0:
            raise ValueError("flow_steps must be >= 0 (0 = upstream's 10)")
        if self.first_chunk_tokens < -1:
            raise ValueError("first_chunk_tokens must be >= -1 (-1 = the preset's or off, 0 = off)")
        if self.voice_prefix_mb < 0:
            raise ValueError("voice_prefix_mb must be >= 0 (0 = off)")
        if self.heap_trim_s < 0:
            raise ValueError("heap_trim_s must be >= 0 (0 = never)")
        if self.threads < 0 or self.stage_workers < 0:
            raise ValueError("threads and stage_workers must be >= 0 (0 = automatic)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}: "
                                 f"{getattr(self, f.name)!r}")
        if any(not t for t in self.tokens):
            raise ValueError("empty token")
        if self.role in ("frontend", "backend") and not self.internal_token:
            raise ValueError(f"--role {self.role} needs --internal-token (or COSYSERVE_INTERNAL_TOKEN)")
        if self.role == "frontend" and not self.backends and not self.backend_dns:
            raise ValueError("--role frontend needs at least one --backend URL or --backend-dns name:port")
        if self.backend_dns:
            name, _, port = self.backend_dns.rpartition(":")
            if not name or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--backend-dns must be name:port: {self.backend_dns!r}")
        if self.backend_check_s <= 0 or self.backend_eject_after < 1:
            raise ValueError("backend_check_s must be positive and backend_eject_after >= 1")
        for url in self.backends:
            if not url.startswith("http://"):
                raise ValueError(f"--backend must be an http:// URL: {url!r}")
        if self.store == "s3" and not self.s3_bucket:
            raise ValueError("--store s3 needs --s3-bucket")


def env_name(f: Field[Any]) -> str:
    return ENV_PREFIX + f.name.upper()


def flag_name(f: Field[Any]) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def _default_text(f: Field[Any]) -> str:
    default = f.default if f.default is not MISSING else None
    if default in ("", None, ()):
        return "unset"
    if isinstance(default, Path) and not default.is_absolute():
        return f"./{default}"
    return str(default)


def _arg_type(f: Field[Any]) -> Any:
    kind = str(f.type)
    if "Path" in kind:
        return Path
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def _is_list(f: Field[Any]) -> bool:
    return str(f.type).startswith("tuple")


def build_parser() -> argparse.ArgumentParser:
    secrets = ", ".join(env_name(f) for f in fields(ServerConfig) if f.metadata.get("env_only"))
    p = argparse.ArgumentParser(
        prog="python -m server", description="CosyVoice2 speech server (PAI-EAS CosyVoice2 API).",
        epilog=f"Every flag can also be set by its environment variable; a flag wins over it. "
               f"Secrets are read from the environment only: {secrets}.")
    for f in fields(ServerConfig):
        if f.metadata.get("env_only"):
            continue
        text = f"{f.metadata['help']} [default: {_default_text(f)}; env {env_name(f)}]".replace("%", "%%")
        if _is_list(f):
            p.add_argument(flag_name(f), dest=f.name, action="append", metavar=f.name[:-1].upper(), help=text)
            continue
        kind = _arg_type(f)
        metavar = None if f.metadata.get("choices") else {int: "N", float: "X", Path: "DIR"}.get(kind, "TEXT")
        p.add_argument(flag_name(f), dest=f.name, type=kind, choices=f.metadata.get("choices"),
                       metavar=metavar, help=text)
    return p


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """CLI flags win over env vars (COSYSERVE_HOST, COSYSERVE_PORT, ..., COSYSERVE_TOKENS comma-separated)."""
    env = os.environ if env is None else env
    args = vars(build_parser().parse_args(argv))
    values: dict[str, object] = {}
    for f in fields(ServerConfig):
        raw = env.get(env_name(f))
        if _is_list(f):  # repeatable flag; env: comma-separated
            items = args.get(f.name) or [t for t in (raw or "").split(",") if t]
            values[f.name] = tuple(items)
            continue
        if raw is not None:
            values[f.name] = _arg_type(f)(raw)
        if args.get(f.name) is not None:
            values[f.name] = args[f.name]
    if not values["tokens"] and values.get("role", "all") != "backend":  # a backend never sees public tokens
        raise SystemExit("at least one --token (or COSYSERVE_TOKENS) is required")
    return ServerConfig(**values)  # type: ignore[arg-type]
