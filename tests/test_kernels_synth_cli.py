"""`python -m kernels.reference.synth`: one wav per mode, streaming and not, on the project's tiny model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kernels.reference import synth
from scheduler.jobs import Mode


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    t = np.arange(int(2.5 * 16000)) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 160 * t) * (1 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    path = tmp_path_factory.mktemp("prompt") / "prompt.wav"
    sf.write(path, wav, 16000, subtype="PCM_16")
    return path


@pytest.mark.parametrize("mode", [m.value for m in Mode])
def test_stream_and_offline_wavs_have_the_same_length(mode, tiny_model_dir, prompt_wav, tmp_path):
    lengths = {}
    for stream in (False, True):
        out = tmp_path / f"{mode}-{stream}.wav"
        argv = ["--model-dir", str(tiny_model_dir), "--mode", mode, "--text", "你好，世界。",
                "--prompt-wav", str(prompt_wav), "--prompt-text", "希望你以后能够做的比我还好呦。",
                "--instruct", "用开心的语气说", "--seed", "3", "--out", str(out)]
        assert synth.main(argv + (["--stream"] if stream else [])) == 0
        audio, rate = sf.read(out)
        assert rate == 24000
        lengths[stream] = audio.shape[0]
    assert lengths[False] == lengths[True] > 0
    assert lengths[False] % 960 == 0  # 960 samples per speech token
