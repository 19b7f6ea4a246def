"""Build the server's state from its config: store, voice cache, thread pool, engine, prompt extractor.

`create_app(config, engine=..., extract_prompt=...)` takes the engine and the prompt extractor
as injected objects (tests pass fakes); `build_engine(config)` and `build_extractor(model_dir)`
construct the real ones; torch is imported only there, so that the server package stays
importable (and testable) without loading it.
"""
from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import logging
from pathlib import Path

from frontend.model_files import QWEN_DIR
from frontend.prepare import TextPreparer
from frontend.text_normalize import TextFrontend
from frontend.text_process import TextProcess
from kernels.features.extractor import (
    PromptExtractor,  # light: it loads its onnxruntime models and torch lazily
)
from scheduler.jobs import EngineProtocol
from server.config import ServerConfig
from server.presets import engine_options
from server.remote_engine import RemoteEngine
from server.state import ExtractPrompt, ServerState
from server.store import VoiceStore
from server.store_base import NoStore, VoiceStoreBase
from server.store_s3 import S3Settings, S3VoiceStore  # boto3, an optional extra, loads only when one is made
from server.voices import FeatureCache, VoiceCache, with_text_ids

log = logging.getLogger("server")


def create_app(config: ServerConfig, engine: EngineProtocol | None = None,
               extract_prompt: ExtractPrompt | None = None) -> ServerState:
    """`--role all` and `backend`: the engine in this process; `frontend`: a RemoteEngine (no torch), whose
    backend also computes the prompt features of uploads. A backend has no store (voices come with jobs)."""
    if config.role == "frontend" and engine is None:
        remote = build_remote_engine(config)
        engine, extract_prompt = remote, extract_prompt or remote.extract_prompt
    if engine is None or extract_prompt is None:
        require_engine_packages(config.role)
    model_dir = resolve_model_dir(config) if engine is None or extract_prompt is None else None
    engine = engine if engine is not None else build_engine(config, model_dir)
    extract_prompt = extract_prompt if extract_prompt is not None else build_extractor(model_dir)
    store: VoiceStoreBase = NoStore() if config.role == "backend" else build_store(config)
    return ServerState(config=config, engine=engine, extract_prompt=extract_prompt, store=store,
                       voices=VoiceCache(store, config.voice_cache_size, functools.partial(with_text_ids, engine)),
                       pool=concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix="cosy-work"),
                       features=FeatureCache(config.voice_cache_size) if config.role == "backend" else None)


def build_remote_engine(config: ServerConfig) -> RemoteEngine:
    """The frontend's engine: text prepared here (the model dir's tokenizer files only), jobs routed over
    the --backend URLs and/or the --backend-dns addresses."""
    directory = config.model_dir if config.model_dir is not None else config.data_dir / "tiny-model"
    if not (directory / QWEN_DIR).is_dir():
        raise SystemExit(f"--role frontend needs --model-dir with the tokenizer ({directory / QWEN_DIR} not found)")
    return RemoteEngine(config.backends, config.internal_token, text_preparer(config, directory),
                        dns=config.backend_dns, check_s=config.backend_check_s,
                        eject_after=config.backend_eject_after)


def text_preparer(config: ServerConfig, directory: Path) -> TextPreparer:
    """Text -> token ids with the model directory's tokenizer files (torch-free)."""
    return TextPreparer(TextFrontend(directory), TextProcess(directory) if config.text_process else None)


def build_store(config: ServerConfig) -> VoiceStoreBase:
    """`--store local` (default): data_dir; `--store s3`: a bucket that several replicas share."""
    if config.store == "s3":
        return S3VoiceStore(S3Settings(
            bucket=config.s3_bucket, prefix=config.s3_prefix, endpoint_url=config.s3_endpoint,
            region=config.s3_region, access_key=config.s3_access_key, secret_key=config.s3_secret_key,
            addressing_style=config.s3_addressing_style, max_connections=config.workers + 10))  # + the list fetchers
    return VoiceStore(config.data_dir)


def resolve_model_dir(config: ServerConfig) -> Path:
    if config.model_dir is not None:
        return config.model_dir
    out = config.data_dir / "tiny-model"
    for line in ("=" * 72,
                 f"NO --model-dir GIVEN: using a TINY model with RANDOM WEIGHTS at {out}",
                 "Every response will be NOISE, not speech.",
                 "Pass --model-dir /path/to/CosyVoice2-0.5B (the released directory) for real output.",
                 "=" * 72):
        log.warning(line)
    if not (out / "cosyvoice2.yaml").exists():
        from kernels.weights.make_checkpoint import main as make_checkpoint  # lazy: pulls torch
        make_checkpoint(["--preset", "tiny", "--out", str(out)])
    return out


ENGINE_PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "yaml": "pyyaml", "safetensors": "safetensors"}


def require_engine_packages(role: str) -> None:
    """A clear exit instead of an ImportError deep in the kernels when the `engine` extra is missing
    (the base install is the torch-free frontend)."""
    missing = [dist for module, dist in ENGINE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(
            f"--role {role} runs the engine, which needs {', '.join(missing)}: install the engine extra "
            "(pip install -e '.[engine]'); only --role frontend runs without it"
        )


def build_engine(config: ServerConfig, model_dir: Path | None = None) -> EngineProtocol:
    """The one place the real engine is constructed (kernels.runtime.engine.Engine), with the CPU settings
    left on auto chosen from the model's size and the cores (logged)."""
    # lazy: torch and the kernels load only when a real engine is wanted (tests inject fakes)
    from kernels.runtime.auto_settings import settings_for
    from kernels.runtime.device import default_device, set_intra_op_threads
    from kernels.runtime.engine import Engine, EngineConfig
    from scheduler.chunk_policy import ChunkPolicyConfig
    from scheduler.config import SchedulerConfig

    directory = model_dir if model_dir is not None else resolve_model_dir(config)
    device = default_device(config.device)
    settings = settings_for(directory, threads=config.threads, stage_workers=config.stage_workers,
                            overlap_stages=config.overlap_stages, cuda=device.startswith("cuda"),
                            llm_dtype=config.llm_dtype, flow_dtype=config.flow_dtype)
    options = engine_options(config, cuda=device.startswith("cuda"), small_model=settings.small_model)
    if options.reason:
        log.info("%s", options.reason)
    for reason in settings.reasons:
        log.info("auto setting: %s", reason)
    if settings.threads:
        set_intra_op_threads(settings.threads)  # before the engine thread starts: it inherits the count
    engine_config = EngineConfig(
        text_process=bool(config.text_process),
        scheduler=SchedulerConfig(num_slots=config.max_batch,
                                  chunk=ChunkPolicyConfig(lead_hop=options.first_chunk_tokens)),
        cuda_graphs=bool(config.cuda_graphs),
        overlap_stages=settings.overlap_stages,
        max_jobs=1 if config.max_batch == 1 else 0,  # batching off = one request at a time, end to end
        stage_workers=settings.stage_workers,
        llm_dtype=settings.llm_dtype,
        flow_dtype=settings.flow_dtype,
        flow_steps=options.flow_steps,
        llm_int8=options.llm_int8,
        packed_linears=bool(config.packed_linears),
        flow_cache_pool_bytes=config.flow_cache_mb << 20 if config.flow_cache_mb >= 0 else -1,
        heap_trim_s=config.heap_trim_s,
        voice_prefix_bytes=config.voice_prefix_mb << 20,
    )
    engine = Engine(directory, device=device, config=engine_config)
    if engine.model.load_stats is not None:
        log.info("model %s loaded in %.1f s", directory, engine.model.load_stats.seconds)
    if config.warmup:
        from kernels.runtime.warmup import warm_up  # lazy: torch, as above
        warm_up(engine)
    return engine  # type: ignore[return-value]


def build_extractor(model_dir: Path | None) -> ExtractPrompt:
    assert model_dir is not None
    return PromptExtractor(model_dir).extract  # type: ignore[no-any-return]


def startup_line(state: ServerState, port: int) -> str:
    """The URL, then what the engine runs with (device, dtypes, threads, batch, attention, flow cache)."""
    host = state.config.host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    describe = getattr(state.engine, "describe", None)
    engine = describe() if callable(describe) else type(state.engine).__name__
    return (f"{url} · {engine}, max inflight {state.config.max_inflight} · "
            f"model {state.config.model_dir or 'TINY RANDOM (noise)'} · store {state.config.store}")
