"""`python -m kernels.reference.synth`: synthesise one wav from text + a prompt wav, no server, no batching.

    python -m kernels.reference.synth --model-dir DIR --mode zero_shot --text "..." \
        --prompt-wav prompt.wav --prompt-text "..." [--instruct "..."] [--stream] [--speed 1.0] --out out.wav
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from scheduler.jobs import Mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.ZERO_SHOT.value)
    parser.add_argument("--text", required=True)
    parser.add_argument("--prompt-wav", type=Path, required=True)
    parser.add_argument("--prompt-text", default="")
    parser.add_argument("--instruct", default=None)
    parser.add_argument("--stream", action="store_true", help="chunked synthesis (25 -> 50 -> 100 token hops)")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from frontend.text_normalize import TextFrontend
    from kernels.features.extractor import PromptExtractor
    from kernels.reference.synthesis import Synthesizer
    from kernels.weights.model import load_model

    model = load_model(args.model_dir, device=args.device)
    wav, sr = sf.read(str(args.prompt_wav), dtype="float32", always_2d=False)
    voice = PromptExtractor(args.model_dir).extract(wav, sr, args.prompt_text)
    synth = Synthesizer(model, TextFrontend(args.model_dir))
    t0 = time.perf_counter()
    chunks = list(synth.synthesize(Mode(args.mode), voice, args.text, args.instruct, args.stream, args.speed, args.seed))
    elapsed = time.perf_counter() - t0
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    sf.write(str(args.out), np.clip(audio, -1.0, 1.0), model.config.sample_rate, subtype="PCM_16")
    seconds = audio.shape[0] / model.config.sample_rate
    print(f"wrote {args.out}: {seconds:.2f} s of audio in {len(chunks)} chunk(s), {elapsed:.2f} s "
          f"(RTF {elapsed / max(seconds, 1e-9):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
