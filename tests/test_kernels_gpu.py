"""GPU paths a CPU run never takes: CUDA-graph decode, flash-attn, the whole engine on CUDA.

On a machine with a card: `python -m pytest tests/test_kernels_gpu.py`. Without CUDA every CUDA case
is skipped with its reason; the CPU cases drive the same harnesses (eager vs eager, SDPA vs a float64
reference), so the comparison code is itself tested on every run.

The LLM harness drives `ModelRunner.execute_llm` with hand-built plans (no scheduler, no threads):
three seeded requests of different lengths, so the decode batch shrinks 3 -> 2 -> 1 and the graph
path goes through a padded bucket (3 -> 4), exact buckets, and (with buckets (1, 2)) the eager
fallback above the largest bucket, all writing the same KV cache.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from kernels.features.extractor import PromptExtractor
from kernels.features.mel import flow_prompt_mel
from kernels.networks.attention import (
    decode_attention,
    flash_attn_available,
    flash_decode_attention,
    prefill_attention,
    use_flash,
)
from kernels.networks.kv_cache import KVCache
from kernels.runtime.engine import Engine, EngineConfig
from kernels.runtime.runner import ModelRunner
from kernels.weights.model import load_model
from scheduler.config import SchedulerConfig
from scheduler.jobs import AudioChunk, Finished, Mode, SpeechJob, VoicePrompt
from scheduler.plan import (
    SOS,
    TASK,
    DecodeItem,
    NewRequest,
    PrefillItem,
    SampleSpec,
    StepPlan,
    speech_segment,
    text_segment,
)
from tests.test_kernels_engine import Collector

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False)"
NO_FLASH = "needs flash-attn on CUDA (pip install -e '.[gpu]'); the engine then runs torch SDPA"
needs_cuda = pytest.mark.skipif(not CUDA, reason=NO_CUDA)
needs_flash = pytest.mark.skipif(not (CUDA and flash_attn_available()), reason=NO_FLASH if CUDA else NO_CUDA)

# request id -> (text ids, prompt speech ids, decode steps); different lengths shrink the batch 3 -> 2 -> 1
REQUESTS = {"a": (7, 5, 24), "b": (12, 9, 16), "c": (4, 3, 8)}
SLOT_LEN = 96  # >= the longest prompt + steps (14 + 24 + ...); also the graph path's fixed span
# fp32 log-probs along two summation orders (graph: span SLOT_LEN, batch padded to the bucket; eager:
# span pos+1): a few u * sqrt(64) ~ 1e-6 per layer; 1e-4 leaves ample room and still catches any
# wrong slot, position or stale buffer (those move log-probs by O(0.1) or more).
FP32_ATOL = 1e-4


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """Engine() switches TF32 on process-wide on CUDA; fp32 comparisons here need real fp32 matmuls."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def model_for(tiny_model_dir):
    """(device, llm dtype) -> the tiny model, loaded once per pair."""
    cache = {}

    def get(device: str, dtype: torch.dtype):
        if (device, dtype) not in cache:
            cache[device, dtype] = load_model(tiny_model_dir, device=device, llm_dtype=dtype)
        return cache[device, dtype]

    return get


def make_runner(model, cuda_graphs: bool, buckets: tuple[int, ...] = (1, 2, 4)) -> ModelRunner:
    return ModelRunner(model, num_slots=len(REQUESTS), slot_len=SLOT_LEN, cuda_graphs=cuda_graphs,
                       graph_buckets=buckets, stage_workers=1)


# The flow is never run here; the runner only needs a prompt to hold per request.
DUMMY_VOICE = VoicePrompt(speech_tokens=np.zeros(2, np.int32), embedding=np.zeros(192, np.float32),
                          mel=np.zeros((4, 80), np.float32), text="")


@dataclass
class LlmTrace:
    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # sampled, in order
    logprobs: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))  # [V] fp32, CPU
    batches: list[int] = field(default_factory=list)  # decode batch size per step

    def logp(self, rid: str) -> torch.Tensor:
        return torch.stack(self.logprobs[rid])


def _prompt(model, index: int, n_text: int, n_speech: int):
    g = torch.Generator().manual_seed(100 + index)
    cfg = model.config.llm
    text = torch.randint(0, cfg.qwen.vocab_size, (n_text,), generator=g).tolist()
    speech = torch.randint(0, cfg.speech_token_size, (n_speech,), generator=g).tolist()
    return (SOS, text_segment(text), TASK, speech_segment(speech))


def run_llm(runner: ModelRunner, forced: dict[str, list[int]] | None = None) -> LlmTrace:
    """Prefill REQUESTS in one step, then decode each for its number of steps, feeding back the sampled
    token, or with `forced`, that run's tokens (teacher forcing: both runs see the same inputs, so a
    single bf16 rounding flip cannot make the rest of the sequences diverge)."""
    trace = LlmTrace()
    win = runner.llm_cfg.win_size
    sample = runner._sample

    def spy(hidden, items):  # what the sampler saw, row by row (hidden may be a graph's static output)
        logp = runner.model.llm.logprobs(hidden).float().cpu()
        for row, item in enumerate(items):
            trace.logprobs[item.request_id].append(logp[row])
        return sample(hidden, items)

    runner._sample = spy
    history: dict[str, list[int]] = {rid: [] for rid in REQUESTS}
    position: dict[str, int] = {}

    def take(sampled: dict[str, int]) -> None:
        for rid, tok in sampled.items():
            trace.tokens[rid].append(tok)
            history[rid].append(forced[rid][len(history[rid])] if forced else tok)

    def spec(rid: str, step: int) -> SampleSpec:  # stop ids masked: every request runs its full length
        return SampleSpec(ignore_eos=True, recent_ids=tuple(history[rid][-win:]), step=step, ignore_all_stops=True)

    prefills, admitted = [], []
    for slot, (rid, (n_text, n_speech, _)) in enumerate(REQUESTS.items()):
        admitted.append(NewRequest(rid, DUMMY_VOICE, seed=7 + slot))
        segments = _prompt(runner.model, slot, n_text, n_speech)
        prefills.append(PrefillItem(rid, slot, 0, segments, spec(rid, 0)))
        position[rid] = sum(s.length for s in segments)
    take(runner.execute_llm(StepPlan(step=0, prefills=tuple(prefills), admitted=tuple(admitted))).sampled)
    for step in range(1, max(steps for _, _, steps in REQUESTS.values()) + 1):
        decodes = tuple(
            DecodeItem(rid, slot, position[rid], history[rid][-1], spec(rid, step))
            for slot, (rid, (_, _, steps)) in enumerate(REQUESTS.items()) if step <= steps
        )
        trace.batches.append(len(decodes))
        take(runner.execute_llm(StepPlan(step=step, decodes=decodes)).sampled)
        for d in decodes:
            position[d.request_id] += 1
    for rid in REQUESTS:
        runner.release(rid)
    return trace


class ReplayCounter:
    """Wraps DecodeGraphs.run: the batch size of every call and whether a graph served it."""

    def __init__(self, runner: ModelRunner) -> None:
        graphs = runner.graphs
        assert graphs is not None, "the runner built no CUDA graphs"
        assert graphs.enabled, "CUDA-graph capture failed (see the warning in the log): nothing to compare"
        self.calls: list[tuple[int, bool]] = []
        run = graphs.run

        def counted(embeds, slots, positions):
            out = run(embeds, slots, positions)
            self.calls.append((int(embeds.shape[0]), out is not None))
            return out

        graphs.run = counted


# ---------------------------------------------------------------- (a) CUDA-graph decode vs eager

@contextlib.contextmanager
def llm_settings(lm, **settings):
    """Set Qwen2LM attributes (attn_backend, cpu_rowwise_min_span) for a block; the model is shared."""
    saved = {name: getattr(lm, name) for name in settings}
    for name, value in settings.items():
        setattr(lm, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(lm, name, value)


# On CPU the second run takes the other CPU decode path (per-row attention on cache views, another
# summation order), so the comparison there is not trivially exact and tests the harness itself.
ROWWISE = {"cpu_rowwise_min_span": 0}
GRAPH_CASES = [
    pytest.param("cpu", False, (1, 2, 4), ROWWISE, id="cpu-static-vs-rowwise-eager"),
    pytest.param("cuda", True, (1, 2, 4), {}, marks=needs_cuda, id="cuda-graphs-padded-bucket"),
    pytest.param("cuda", True, (1, 2), {}, marks=needs_cuda, id="cuda-graphs-and-eager-above-largest-bucket"),
]


@pytest.mark.parametrize(("device", "graphs", "buckets", "other"), GRAPH_CASES)
def test_graph_decode_equals_eager_token_for_token(model_for, device, graphs, buckets, other):
    model = model_for(device, torch.float32)
    with llm_settings(model.llm, attn_backend="sdpa"):  # flash-attn has no fp32 kernels
        eager = run_llm(make_runner(model, cuda_graphs=False))
        runner = make_runner(model, cuda_graphs=graphs, buckets=buckets)
        counter = ReplayCounter(runner) if graphs else None
        with llm_settings(model.llm, **other):
            got = run_llm(runner)

    assert eager.batches == got.batches and set(eager.batches) == {1, 2, 3}
    for rid, (_, _, steps) in REQUESTS.items():
        assert len(got.tokens[rid]) == steps + 1
        assert got.tokens[rid] == eager.tokens[rid], f"request {rid}: sampled tokens differ"
        torch.testing.assert_close(got.logp(rid), eager.logp(rid), atol=FP32_ATOL, rtol=0)
    if counter is not None:  # every batch that fits a bucket was replayed, the others ran eagerly
        assert counter.calls == [(b, b <= max(buckets)) for b in got.batches]


BF16_CASES = [
    pytest.param("cpu", False, ROWWISE, id="cpu-static-vs-rowwise-eager"),
    pytest.param("cuda", True, {}, marks=needs_cuda, id="cuda-graphs-vs-eager"),
]


@pytest.mark.parametrize(("device", "graphs", "other"), BF16_CASES)
def test_bf16_graph_decode_tracks_eager(model_for, device, graphs, other):
    """The production CUDA setting (bf16 LLM, flash-attn when installed). Graph and eager differ in
    summation order (span, padded batch), which in bf16 moves log-probs by ~0.1 (CPU: static vs per-row
    attention, 0.14-0.21) and so changes sampled tokens. Inputs are therefore teacher-forced, and the
    log-probs are held to bf16's own error: replay may stray from eager by at most twice as far as bf16
    eager strays from fp32 eager on the same inputs (CPU: 0.26-0.32, so the ratio seen is 0.5-0.7)."""
    model = model_for(device, torch.bfloat16)
    with llm_settings(model.llm, attn_backend="auto"):
        eager = run_llm(make_runner(model, cuda_graphs=False))
        runner = make_runner(model, cuda_graphs=graphs)
        counter = ReplayCounter(runner) if graphs else None
        with llm_settings(model.llm, **other):
            got = run_llm(runner, forced=eager.tokens)
    fp32_model = model_for(device, torch.float32)
    with llm_settings(fp32_model.llm, attn_backend="sdpa"):
        fp32 = run_llm(make_runner(fp32_model, cuda_graphs=False), forced=eager.tokens)

    for rid in REQUESTS:
        bf16_error = (eager.logp(rid) - fp32.logp(rid)).abs().max().item()
        drift = (got.logp(rid) - eager.logp(rid)).abs().max().item()
        print(f"request {rid}: bf16 vs fp32 {bf16_error:.2e}, other path vs eager {drift:.2e}")
        assert 0 < bf16_error < 1.0, "bf16 eager should be near, but not equal to, fp32"
        assert drift <= 2 * bf16_error, f"request {rid}: drifts {drift:.2e} from eager (bf16 error {bf16_error:.2e})"
        # where eager's top token leads clearly, the other run ranks it first too
        top2 = eager.logp(rid).topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 4 * bf16_error
        same = got.logp(rid).argmax(-1) == eager.logp(rid).argmax(-1)
        assert bool(same[clear].all()), f"request {rid}: a clear argmax changed"
    if counter is not None:
        assert counter.calls and all(hit for _, hit in counter.calls)


# ---------------------------------------------------------------- (b) flash-attn vs SDPA

def reference_attention(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(d)) v with a bool mask; q [..., T, D], k/v [..., S, D], mask [T, S]."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=needs_cuda, id="cuda")]


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_and_decode_attention_match_a_float64_reference(device):
    """The SDPA paths that flash-attn is compared with: GQA head order (query head h uses KV head h // G),
    causal offset of a continued prefill, and per-row decode masks."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, start, t = 8, 2, 64, 5, 7
    q = torch.randn(t, hq, d, generator=g).to(device)
    k = torch.randn(hkv, start + t, d, generator=g).to(device)
    v = torch.randn(hkv, start + t, d, generator=g).to(device)
    out = prefill_attention(q, k, v, start)
    mask = torch.arange(start + t)[None, :] <= torch.arange(start, start + t)[:, None]
    kk, vv = (x.repeat_interleave(hq // hkv, dim=0) for x in (k, v))  # HF repeat_kv
    ref = reference_attention(q.transpose(0, 1), kk, vv, mask.to(device)).transpose(0, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=0)

    b, s = 3, 11
    qd = torch.randn(b, hq, d, generator=g).to(device)
    kc = torch.randn(b, hkv, s, d, generator=g).to(device)
    vc = torch.randn(b, hkv, s, d, generator=g).to(device)
    positions = torch.tensor([0, 4, 10])
    valid = (torch.arange(s)[None, :] <= positions[:, None]).to(device)
    out = decode_attention(qd, kc, vc, valid)
    kk, vv = (x.repeat_interleave(hq // hkv, dim=1) for x in (kc, vc))
    ref = reference_attention(qd[:, :, None], kk, vv, valid[:, None, None, :])[:, :, 0]
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=0)


def test_use_flash_only_on_cuda_and_when_asked():
    assert not use_flash(torch.device("cpu"), "auto")
    assert not use_flash(torch.device("cuda"), "sdpa")
    with pytest.raises(RuntimeError, match="flash"):
        use_flash(torch.device("cpu"), "flash")
    assert use_flash(torch.device("cuda"), "auto") == flash_attn_available()
    assert use_flash(torch.device("cuda"), "auto", torch.bfloat16) == flash_attn_available()
    assert not use_flash(torch.device("cuda"), "auto", torch.float32)  # flash-attn has no fp32 kernels
    with pytest.raises(RuntimeError, match="flash"):
        use_flash(torch.device("cuda"), "flash", torch.float32)
    if not flash_attn_available():  # asking for flash without it is an error, not a silent fallback
        with pytest.raises(RuntimeError, match="flash"):
            use_flash(torch.device("cuda"), "flash")


# bf16 outputs of |x| <~ 3: one rounding is <= 2^-8 relative; two implementations may round apart
BF16_ATTN = {"atol": 2e-2, "rtol": 2e-2}


@needs_cuda
@needs_flash
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_decode_equals_sdpa_decode_and_writes_the_cache(dtype):
    """flash_decode_attention (writes k/v at `positions` of `slots` itself, reads the pool in place) against
    write_decode + gather + decode_attention on a copy of the same pool: same output, same cache."""
    g = torch.Generator().manual_seed(1)
    layers, slots, hkv, hq, d, max_len = 1, 5, 2, 8, 64, 40
    sdpa_kv = KVCache(layers, slots, max_len, hkv, d, "cuda", dtype)
    sdpa_kv.k.copy_(torch.randn(sdpa_kv.k.shape, generator=g))
    sdpa_kv.v.copy_(torch.randn(sdpa_kv.v.shape, generator=g))
    flash_k, flash_v = sdpa_kv.k.clone(), sdpa_kv.v.clone()
    rows = torch.tensor([3, 0, 4], device="cuda")  # slots, not in order; slot 1 and 2 must stay untouched
    positions = torch.tensor([0, 17, 39], device="cuda")  # first position, middle, the slot's last
    b = rows.numel()
    q = torch.randn(b, hq, d, generator=g).to("cuda", dtype)
    k_new = torch.randn(b, hkv, d, generator=g).to("cuda", dtype)
    v_new = torch.randn(b, hkv, d, generator=g).to("cuda", dtype)

    out = flash_decode_attention(q, flash_k[0], flash_v[0], k_new, v_new, rows, positions)
    sdpa_kv.write_decode(0, rows, positions, k_new, v_new)
    kc, vc = sdpa_kv.gather(0, rows, max_len)
    valid = torch.arange(max_len, device="cuda")[None, :] <= positions[:, None]
    expected = decode_attention(q, kc, vc, valid)
    torch.cuda.synchronize()

    assert out.shape == expected.shape == (b, hq, d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), **BF16_ATTN)
    torch.testing.assert_close(flash_k, sdpa_kv.k, atol=0, rtol=0)  # the new keys landed where SDPA put them
    torch.testing.assert_close(flash_v, sdpa_kv.v, atol=0, rtol=0)


@needs_cuda
@needs_flash
def test_flash_prefill_semantics_equal_prefill_attention():
    """prefill_attention is SDPA-only; flash-attn's causal mask for T queries over S keys is aligned to the
    end (query i sees keys <= S - T + i), the same rule as start_pos = S - T: checked so a flash prefill
    could replace it one for one."""
    from flash_attn import flash_attn_func

    g = torch.Generator().manual_seed(2)
    hq, hkv, d, start, t = 8, 2, 64, 9, 6
    q = torch.randn(t, hq, d, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(hkv, start + t, d, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(hkv, start + t, d, generator=g).to("cuda", torch.bfloat16)
    ours = prefill_attention(q, k, v, start)
    k_flash, v_flash = (x.transpose(0, 1).contiguous()[None] for x in (k, v))  # [1, S, Hkv, D]
    flash = flash_attn_func(q[None], k_flash, v_flash, causal=True)[0]
    torch.testing.assert_close(flash.float(), ours.float(), **BF16_ATTN)


def decode_trace(lm, device: str, **settings) -> tuple[torch.Tensor, KVCache]:
    """Prefill three slots, then decode 12 fixed tokens into each: (hidden [12, 3, H] fp32, the cache)."""
    dtype = next(lm.parameters()).dtype
    kv = KVCache.for_model(lm.cfg.qwen, 3, SLOT_LEN, device, dtype)
    g = torch.Generator().manual_seed(3)
    starts, outs = [], []
    with llm_settings(lm, **settings):
        for slot, n in enumerate((9, 14, 5)):  # prefill is SDPA on every backend
            ids = torch.randint(0, lm.cfg.speech_token_size, (n,), generator=g)
            lm.prefill(lm.speech_embed(ids.to(device)), slot, 0, kv)
            starts.append(n)
        for step in range(12):
            tokens = torch.randint(0, lm.cfg.speech_token_size, (3,), generator=g).to(device)
            positions = torch.tensor([s + step for s in starts], device=device)
            outs.append(lm.decode(lm.speech_embed(tokens), torch.arange(3, device=device), positions, kv,
                                  span=int(positions.max()) + 1))
    if device == "cuda":
        torch.cuda.synchronize()
    return torch.stack(outs).float(), kv


ATTENTION_PAIRS = [
    pytest.param("cpu", {"cpu_rowwise_min_span": 10**9}, ROWWISE, id="cpu-static-vs-rowwise"),
    pytest.param("cuda", {"attn_backend": "sdpa"}, {"attn_backend": "flash"}, marks=[needs_cuda, needs_flash],
                 id="cuda-sdpa-vs-flash"),
]


@pytest.mark.parametrize(("device", "base", "other"), ATTENTION_PAIRS)
def test_bf16_llm_decode_with_flash_tracks_sdpa(model_for, device, base, other):
    """The tiny bf16 LLM decoding the same tokens with backend sdpa and with flash: hidden states and the
    caches they write differ by at most twice bf16's own error against the fp32 model on SDPA (CPU,
    static vs per-row attention as the two paths: ratios 0.4-0.7)."""
    lm = model_for(device, torch.bfloat16).llm
    hidden, kv = decode_trace(lm, device, **base)
    hidden_other, kv_other = decode_trace(lm, device, **other)
    hidden_fp32, kv_fp32 = decode_trace(model_for(device, torch.float32).llm, device, attn_backend="sdpa")
    for name, a, b, ref in (("hidden", hidden_other, hidden, hidden_fp32), ("k", kv_other.k, kv.k, kv_fp32.k),
                            ("v", kv_other.v, kv.v, kv_fp32.v)):
        a, b, ref = a.float(), b.float(), ref.float()
        bf16_error = (b - ref).abs().max().item()
        drift = (a - b).abs().max().item()
        print(f"{name}: bf16 vs fp32 {bf16_error:.2e}, other path vs base {drift:.2e}")
        assert 0 < bf16_error < 0.5
        assert drift <= 2 * bf16_error, f"{name}: drifts {drift:.2e} (bf16 error {bf16_error:.2e})"


# ---------------------------------------------------------------- (c) the engine on CUDA, end to end

Sink = Collector  # the engine's event sink: keeps events, signals the final one


@needs_cuda
def test_cuda_engine_streams_a_job_to_the_end(tiny_model_dir):
    """Production defaults on CUDA (bf16 LLM, decode graphs, flow/vocoder on a stage stream): a streaming
    job ends with exactly its tokens' worth of finite audio, spectrally close to the CPU fp32 engine's."""
    t = np.arange(int(2.3 * 16000)) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    voice = PromptExtractor(tiny_model_dir).extract(wav, 16000, "希望你以后能够做的比我还好呦。")
    tokens = 100
    job = SpeechJob("gpu", Mode.ZERO_SHOT, voice, "你好，这是一个测试。", stream=True, seed=5, fixed_tokens=tokens)
    audio = {}
    for device in ("cuda", "cpu"):
        engine = Engine(tiny_model_dir, device=device, config=EngineConfig(scheduler=SchedulerConfig(num_slots=4, slot_len=1024)))
        try:
            if device == "cuda":
                assert next(engine.model.llm.parameters()).dtype is torch.bfloat16
                assert engine.runner.graphs is not None and engine.runner.graphs.enabled, engine.describe()
                assert engine.runner.stage_stream is not None
            sink = Sink()
            engine.submit(job, sink)
            assert sink.done.wait(120), f"{device} engine did not finish"
            assert isinstance(sink.events[-1], Finished), sink.events[-1]
            chunks = [e.pcm for e in sink.events if isinstance(e, AudioChunk)]
            assert len(chunks) > 1, "streaming gave a single chunk"
            audio[device] = np.concatenate(chunks)
        finally:
            engine.shutdown(1.0)
    assert audio["cuda"].shape == audio["cpu"].shape == (tokens * 960,)
    assert np.isfinite(audio["cuda"]).all() and np.abs(audio["cuda"]).max() > 0
    # bf16 sampling picks other tokens than fp32, so compare spectra, as the CPU bf16 engine test does
    diff = (flow_prompt_mel(audio["cuda"]) - flow_prompt_mel(audio["cpu"])).abs().mean().item()
    assert diff < 0.6, diff


def _flow_inputs(seed: int, prompt: int = 60, generated: int = 90):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6561, (1, prompt + generated), generator=g)
    return tokens, torch.randn(1, 2 * prompt, 80, generator=g), torch.randn(1, 192, generator=g), prompt


@needs_cuda
@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flow_is_close_to_the_cpu_fp32_flow(tiny_model_dir, dtype, streaming):
    """The flow on the card (fp32, or the opt-in bf16 networks with an fp32 ODE state) against the CPU fp32
    reference: fp32 to float rounding, bf16 within the bound the CPU bf16 test documents (0.6 % measured)."""
    want_flow = load_model(tiny_model_dir).flow
    got_flow = load_model(tiny_model_dir, device="cuda", flow_dtype=dtype).flow
    tokens, feat, emb, prompt = _flow_inputs(1)
    lens, feat_lens = torch.tensor([tokens.size(1)]), torch.tensor([2 * prompt])
    want, _ = want_flow.inference(tokens, lens, feat, feat_lens, emb, streaming, not streaming)
    got, _ = got_flow.inference(tokens.cuda(), lens.cuda(), feat.cuda().to(dtype), feat_lens.cuda(),
                                emb.cuda().to(dtype), streaming, not streaming)
    diff = (got.float().cpu() - want).abs()
    rel, worst = float(diff.mean() / want.abs().mean()), float(diff.max())
    if dtype is torch.float32:
        assert rel < 1e-3 and worst < 5e-2, (rel, worst)  # other kernels, other summation orders
    else:
        assert 0 < rel < 0.02 and worst < 0.15, (rel, worst)


@needs_cuda
def test_cuda_stage_stream_gives_the_serial_engines_audio(tiny_model_dir):
    """Flow/vocoder on the stage thread's own CUDA stream vs all on one thread: the same job (alone, so the
    batches are the same) gives the same audio: the stream only moves work in time."""
    t = np.arange(int(2.3 * 16000)) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    voice = PromptExtractor(tiny_model_dir).extract(wav, 16000, "希望你以后能够做的比我还好呦。")
    job = SpeechJob("s", Mode.ZERO_SHOT, voice, "你好，这是一个测试。", stream=True, seed=7, fixed_tokens=120)
    audio = {}
    for overlap in (True, False):
        engine = Engine(tiny_model_dir, device="cuda", config=EngineConfig(
            scheduler=SchedulerConfig(num_slots=2, slot_len=1024), overlap_stages=overlap, llm_dtype="fp32"))
        try:
            assert (engine.runner.stage_stream is not None) is overlap
            sink = Sink()
            engine.submit(job, sink)
            assert sink.done.wait(120) and isinstance(sink.events[-1], Finished), sink.events[-1]
            audio[overlap] = np.concatenate([e.pcm for e in sink.events if isinstance(e, AudioChunk)])
        finally:
            engine.shutdown(1.0)
    assert audio[True].shape == audio[False].shape
    np.testing.assert_allclose(audio[True], audio[False], atol=1e-4)
