"""HiFT parity: f0, NSF source, decode, and the streaming cache/cross-fade against upstream.

Randomness is taken out by injecting the recorded noise / sources (reference README item 5).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from kernels.networks.hift import HiFTGenerator
from kernels.parity import CaseResult, compare, loaded_model
from kernels.runtime.vocoder_stream import MEL_CACHE_FRAMES, VocoderState, cross_fade, vocode_chunks

TOL_F0_HZ = 2e-3  # f0 up to ~160 Hz; fp32 vs fp64 differs by 9e-5
TOL_WAV = 2e-4  # waveform / source, |x| <= 1


def _missing(name: str, path: Path) -> list[CaseResult]:
    return [CaseResult(name, float("inf"), float("inf"), 0.0, False, f"missing {path.name}")]


def _offline_cases(hift: HiFTGenerator, c: dict[str, torch.Tensor]) -> list[CaseResult]:
    f0 = hift.f0(c["mel"])
    # The recorded rand_ini is not needed: SineGen2 never reads the sample it perturbs.
    source = hift.source(c["f0"], noise=c["sine_noise"])
    speech = hift.decode(c["mel"], c["source"])
    return [
        compare("hift.f0", f0, c["f0"], TOL_F0_HZ),
        compare("hift.source", source, c["source"], TOL_WAV, "from recorded f0 + sine_noise"),
        compare("hift.speech", speech, c["speech"], TOL_WAV, "decode(mel, recorded source)"),
    ]


def _two_chunk_cases(hift: HiFTGenerator, c: dict[str, torch.Tensor]) -> list[CaseResult]:
    speech_a = hift.decode(c["stream.melA"], c["stream.sourceA"])
    speech_b = hift.decode(c["stream.melB_in"], c["stream.sourceB"])
    faded = cross_fade(speech_b[0], speech_a[0, -3840:])
    state = VocoderState()
    out_a, out_b = (
        vocode_chunks(hift, [(state, c[mel][0], False)], sources=[c[src][0]])[0]
        for mel, src in (("stream.melA", "stream.sourceA"), ("stream.melB", "stream.sourceB"))
    )
    return [
        compare("hift.stream.speechA", speech_a, c["stream.speechA"], TOL_WAV),
        compare("hift.stream.speechB_raw", speech_b, c["stream.speechB_raw"], TOL_WAV),
        compare("hift.stream.speechB_faded", faded, c["stream.speechB_faded"][0], TOL_WAV),
        compare("hift.stream.outA", out_a, c["stream.outA"][0], TOL_WAV, "vocode_chunks"),
        compare("hift.stream.outB", out_b, c["stream.speechB_faded"][0, :-3840], TOL_WAV, "vocode_chunks"),
    ]


def _flow_stream_cases(hift: HiFTGenerator, c: dict[str, torch.Tensor]) -> list[CaseResult]:
    results: list[CaseResult] = []
    state = VocoderState()
    k = 0
    while f"stream.hift{k}.speech_feat" in c:
        feat, source = c[f"stream.hift{k}.speech_feat"], c[f"stream.hift{k}.source"]
        is_final = f"stream.hift{k + 1}.speech_feat" not in c
        results.append(compare(f"hift.flow_stream.hift{k}.speech", hift.decode(feat, source),
                               c[f"stream.hift{k}.speech"], TOL_WAV, "decode(feat, recorded source)"))
        if state.mel_cache is not None:  # our cache must be what upstream prepended
            results.append(compare(f"hift.flow_stream.hift{k}.mel_cache", state.mel_cache,
                                   feat[0, :, :MEL_CACHE_FRAMES], 0.0))
            results.append(compare(f"hift.flow_stream.hift{k}.cache_source", state.source_cache,
                                   c[f"stream.hift{k}.cache_source"][0], 0.0))
        new_mel = feat[0] if state.mel_cache is None else feat[0, :, MEL_CACHE_FRAMES:]
        out = vocode_chunks(hift, [(state, new_mel, is_final)], sources=[source[0]])[0]
        results.append(compare(f"hift.flow_stream.yield{k}", out, c[f"stream.yield{k}"][0], TOL_WAV,
                               "vocode_chunks, recorded sources"))
        k += 1
    if k == 0:
        results.append(CaseResult("hift.flow_stream", float("inf"), float("inf"), 0.0, False, "no stream.hift0"))
    offline = vocode_chunks(hift, [(VocoderState(), c["tts_offline.flow_mel"][0], True)],
                            sources=[c["tts_offline.hift_source"][0]])[0]
    results.append(compare("hift.tts_offline.speech", offline, c["tts_offline.speech"][0], TOL_WAV,
                           "vocode_chunks, fresh state, final"))
    return results


def run(model_dir: Path, cases_dir: Path) -> list[CaseResult]:
    model_dir, cases_dir = Path(model_dir), Path(cases_dir)
    hift = loaded_model(model_dir).hift
    results: list[CaseResult] = []
    with torch.inference_mode():
        hift_path = cases_dir / "hift.safetensors"
        if hift_path.is_file():
            cases = load_file(str(hift_path))
            results += _offline_cases(hift, cases) + _two_chunk_cases(hift, cases)
        else:
            results += _missing("hift", hift_path)
        flow_path = cases_dir / "flow.safetensors"
        if flow_path.is_file():
            results += _flow_stream_cases(hift, load_file(str(flow_path)))
        else:
            results += _missing("hift.flow_stream", flow_path)
    return results
