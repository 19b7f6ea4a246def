"""The two ONNX models of a CosyVoice2 model directory, run with onnxruntime on CPU.

* `speech_tokenizer_v2.onnx`: whisper log-mel [B,128,T] f32 + lengths [B] -> 25 Hz speech tokens.
* `campplus.onnx`: mean-normalised kaldi fbank [B,T,80] f32 -> 192-d speaker embedding.

Inputs are passed by position (as upstream does), output 0 is read. The real tokenizer's output
layout is not pinned down ([B,T'] or [B,1,T'], int32 or int64), so every such variant is accepted.
onnxruntime sessions are safe to `run` from several threads at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_TOKENIZER_SECONDS = 30.0  # upstream asserts this for speech-token extraction

_ORT_INT_TYPES = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}


def make_session(path: Path, intra_op_threads: int = 1):  # -> onnxruntime.InferenceSession
    """A CPU session with one intra-op thread (prompt extraction runs beside the engine)."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"{Path(path).name}: not found in {Path(path).parent}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class SpeechTokenizer:
    """S3 speech tokenizer v2: [1,128,L] log-mel -> int32 [ceil(L/4)] tokens (25 Hz)."""

    def __init__(self, path: Path, intra_op_threads: int = 1) -> None:
        self.session = make_session(path, intra_op_threads)
        inputs = self.session.get_inputs()
        if len(inputs) < 2:
            raise ValueError(f"{Path(path).name}: expected 2 inputs (feats, feats_length), got {len(inputs)}")
        self._feats_name = inputs[0].name
        self._len_name = inputs[1].name
        self._len_dtype = _ORT_INT_TYPES.get(inputs[1].type, np.int32)

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        """log_mel [B,128,L] float32 (all items L frames) -> int32 tokens [B, T']."""
        feats = np.ascontiguousarray(log_mel, dtype=np.float32)
        if feats.ndim == 2:
            feats = feats[None]
        lengths = np.full((feats.shape[0],), feats.shape[2], dtype=self._len_dtype)
        out = self.session.run(None, {self._feats_name: feats, self._len_name: lengths})[0]
        return tokens_2d(out, feats.shape[0])


def tokens_2d(raw: np.ndarray, batch: int) -> np.ndarray:
    """Accept [B,T], [B,1,T] (or [T] at batch 1), int32/int64 -> int32 [B,T]."""
    arr = np.asarray(raw)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"speech tokenizer returned {arr.dtype}, expected integers")
    return arr.reshape(batch, -1).astype(np.int32, copy=False)


class SpeakerEncoder:
    """CAM++ x-vector: [1,T,80] mean-normalised fbank -> float32 [192] (not L2-normalised)."""

    def __init__(self, path: Path, intra_op_threads: int = 1) -> None:
        self.session = make_session(path, intra_op_threads)
        self._input_name = self.session.get_inputs()[0].name

    def __call__(self, features: np.ndarray) -> np.ndarray:
        feats = np.ascontiguousarray(features, dtype=np.float32)
        if feats.ndim == 2:
            feats = feats[None]
        out = np.asarray(self.session.run(None, {self._input_name: feats})[0], dtype=np.float32)
        return out.reshape(feats.shape[0], -1)
