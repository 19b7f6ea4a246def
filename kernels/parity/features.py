"""Feature parity: filterbanks, whisper log-mel, kaldi fbank, 24 kHz prompt mel, the two ONNX models.

Each feature is computed from the fixture waveforms; each ONNX model is fed the fixture's own
input, so a feature mismatch and an ONNX-wrapper mismatch show up as separate lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from kernels.parity import CaseResult, compare

TOL_FEATURE = 1e-3  # fp32 features; upstream fp32 vs fp64 differs by 4e-5 (reference README)
TOL_EMBEDDING = 1e-4
FEATURES_FILE = "features.safetensors"
FRONTEND_FILE = "frontend.safetensors"


def _missing(name: str, path: Path) -> list[CaseResult]:
    return [CaseResult(name, float("inf"), float("inf"), 0.0, False, f"missing {path.name}")]


def _feature_cases(c: dict[str, torch.Tensor]) -> list[CaseResult]:
    from kernels.features.fbank import campplus_features, kaldi_fbank
    from kernels.features.mel import FLOW_MEL, flow_prompt_mel, slaney_mel_filters, whisper_log_mel

    wav16k, wav24k = c["wav_16k"][0], c["wav_24k"][0]
    basis = slaney_mel_filters(
        FLOW_MEL.sample_rate, FLOW_MEL.n_fft, FLOW_MEL.n_mels, FLOW_MEL.fmin, FLOW_MEL.fmax
    )
    return [
        compare(
            "features.whisper_mel_filters",
            slaney_mel_filters(16000, 400, 128),
            c["whisper_mel_filters_128x201"],
            TOL_FEATURE,
        ),
        compare("features.whisper_logmel128", whisper_log_mel(wav16k), c["whisper_logmel128"], TOL_FEATURE),
        compare("features.kaldi_fbank80", kaldi_fbank(wav16k), c["kaldi_fbank80"], TOL_FEATURE),
        compare("features.campplus_input", campplus_features(wav16k), c["campplus_input"], TOL_FEATURE),
        compare("features.mel_basis_fmax8000", basis, c["mel_basis_80x961_fmax8000"], TOL_FEATURE),
        compare("features.speech_feat_24k", flow_prompt_mel(wav24k), c["speech_feat_24k"], TOL_FEATURE),
    ]


def _onnx_cases(
    model_dir: Path, c: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
) -> list[CaseResult]:
    from frontend.model_files import CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE
    from kernels.features.onnx_models import SpeakerEncoder, SpeechTokenizer

    tokens = SpeechTokenizer(model_dir / SPEECH_TOKENIZER_FILE)(c["whisper_logmel128"].numpy())
    embedding = SpeakerEncoder(model_dir / CAMPPLUS_FILE)(c["campplus_input"].numpy())
    return [
        compare(
            "features.onnx.speech_token_raw",
            tokens.astype(np.int64),
            ref["speech_token_raw"],
            0.0,
            "fixture log-mel in",
        ),
        compare("features.onnx.embedding", embedding, ref["embedding"], TOL_EMBEDDING, "fixture fbank in"),
    ]


def run(model_dir: Path, cases_dir: Path) -> list[CaseResult]:
    feats_path, frontend_path = cases_dir / FEATURES_FILE, cases_dir / FRONTEND_FILE
    if not feats_path.is_file():
        return _missing("features", feats_path)
    c = load_file(str(feats_path))
    results = _feature_cases(c)
    if not frontend_path.is_file():
        return results + _missing("features.onnx", frontend_path)
    return results + _onnx_cases(Path(model_dir), c, load_file(str(frontend_path)))
