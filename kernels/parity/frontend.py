"""Frontend parity: text normalisation, tokenizer ids, and upstream's per-mode model-input dicts.

The normaliser runs with built-in rules only (`use_wetext=False`): the fixtures were made without
wetext/ttsfrd. String cases report max_abs 0 (equal) or 1 (different), tolerance 0.
The prompt features are computed end to end from the fixture's 16 kHz / 24 kHz waveforms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from kernels.parity import CaseResult, compare
from scheduler.jobs import Mode, VoicePrompt

TOL_FEATURE = 1e-3
TOL_EMBEDDING = 1e-4
FRONTEND_JSON = "frontend.json"
FRONTEND_FILE = "frontend.safetensors"
FEATURES_FILE = "features.safetensors"
MODES = {"zero_shot": Mode.ZERO_SHOT, "cross_lingual": Mode.CROSS_LINGUAL, "instruct2": Mode.INSTRUCT}


def _missing(name: str, path: Path) -> list[CaseResult]:
    return [CaseResult(name, float("inf"), float("inf"), 0.0, False, f"missing {path.name}")]


def _same(name: str, ours: object, ref: object) -> CaseResult:
    ok = ours == ref
    note = "" if ok else f"ours={ours!r} ref={ref!r}"[:300]
    return CaseResult(name, 0.0 if ok else 1.0, 0.0 if ok else 1.0, 0.0, ok, note)


def _text_cases(model_dir: Path, spec: dict, text_frontend) -> list[CaseResult]:
    results = [
        _same(f"frontend.normalize[{i}]", text_frontend.normalize(raw), expected)
        for i, (raw, expected) in enumerate(spec["text_normalize_split_true"].items())
    ]
    results.append(
        _same(
            "frontend.normalize.tts_text",
            text_frontend.normalize(spec["tts_text_raw"]),
            [spec["tts_text_normalized"]],
        )
    )
    results.append(
        _same(
            "frontend.normalize.prompt_text",
            text_frontend.normalize_one(spec["prompt_text_raw"]),
            spec["prompt_text_normalized"],
        )
    )
    results += [
        _same(f"frontend.tokenizer_encode[{i}]", text_frontend.encode(text), ids)
        for i, (text, ids) in enumerate(spec["tokenizer_encode"].items())
    ]
    info_path = model_dir / "tiny_info.json"
    if info_path.is_file():
        expected = json.loads(info_path.read_text(encoding="utf-8")).get("special_token_ids", {})
        results.append(_same("frontend.special_token_ids", text_frontend.special_ids, expected))
    return results


def _ids(values: list[int]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.int64).reshape(1, -1)


def _mode_cases(
    mode_key: str, ref: dict[str, torch.Tensor], voice: VoicePrompt, text_frontend, spec: dict
) -> list[CaseResult]:
    from frontend.prompt import llm_prompt_for

    instruct = spec["instruct_text"] if mode_key == "instruct2" else None
    prompt = llm_prompt_for(MODES[mode_key], voice, text_frontend, instruct)
    text_ids = text_frontend.encode(spec["tts_text_normalized"])
    tokens = torch.from_numpy(voice.speech_tokens.astype(np.int64)).unsqueeze(0)
    ours: dict[str, tuple[object, float]] = {
        "text": (_ids(text_ids), 0.0),
        "text_len": (torch.tensor([len(text_ids)]), 0.0),
        "flow_prompt_speech_token": (tokens, 0.0),
        "flow_prompt_speech_token_len": (torch.tensor([tokens.shape[1]]), 0.0),
        "prompt_speech_feat": (torch.from_numpy(voice.mel).unsqueeze(0), TOL_FEATURE),
        "prompt_speech_feat_len": (torch.tensor([voice.mel.shape[0]]), 0.0),
        "flow_embedding": (torch.from_numpy(voice.embedding).unsqueeze(0), TOL_EMBEDDING),
        "llm_embedding": (torch.from_numpy(voice.embedding).unsqueeze(0), TOL_EMBEDDING),
        "prompt_text": (_ids(prompt.prompt_text_ids), 0.0),
        "prompt_text_len": (torch.tensor([len(prompt.prompt_text_ids)]), 0.0),
        "llm_prompt_speech_token": (_ids(prompt.prompt_speech_tokens), 0.0),
        "llm_prompt_speech_token_len": (torch.tensor([len(prompt.prompt_speech_tokens)]), 0.0),
    }
    results = []
    for key in spec["model_input_keys"][mode_key]:
        value, tol = ours[key]
        results.append(compare(f"frontend.{mode_key}.{key}", value, ref[f"{mode_key}.{key}"], tol))
    # Keys upstream deletes for this mode must be empty on our side (the LLM gets nothing there).
    if "prompt_text" not in spec["model_input_keys"][mode_key]:
        results.append(_same(f"frontend.{mode_key}.prompt_text_empty", prompt.prompt_text_ids, []))
    if "llm_prompt_speech_token" not in spec["model_input_keys"][mode_key]:
        results.append(
            _same(f"frontend.{mode_key}.llm_prompt_speech_token_empty", prompt.prompt_speech_tokens, [])
        )
    return results


def run(model_dir: Path, cases_dir: Path) -> list[CaseResult]:
    from frontend.text_normalize import TextFrontend
    from kernels.features.extractor import PromptExtractor

    model_dir = Path(model_dir)
    paths = [cases_dir / FRONTEND_JSON, cases_dir / FRONTEND_FILE, cases_dir / FEATURES_FILE]
    for path in paths:
        if not path.is_file():
            return _missing("frontend", path)
    spec = json.loads(paths[0].read_text(encoding="utf-8"))
    ref, feats = load_file(str(paths[1])), load_file(str(paths[2]))
    text_frontend = TextFrontend(model_dir, use_wetext=False)
    results = _text_cases(model_dir, spec, text_frontend)
    voice = PromptExtractor(model_dir).features_from_16k_24k(
        feats["wav_16k"][0].numpy(), feats["wav_24k"][0].numpy(), spec["prompt_text_raw"]
    )
    for mode_key in MODES:
        results += _mode_cases(mode_key, ref, voice, text_frontend, spec)
    return results
