"""The tiny random model directory: layout, determinism, configs, tokenizer, ONNX stand-ins, loading."""
from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.config import read_model_config
from kernels.weights.checkpoint import CheckpointError, check_strict, load_state_dict_file
from kernels.weights.layout import EMBED_TOKENS_KEY, FILES, LM_HEAD_KEY, expected_layout, tiny_config
from kernels.weights.make_checkpoint import QWEN2_SPLIT, SPECIALS, cosyvoice2_yaml, main, save_streamed
from tests.conftest import REFERENCE_DIR, needs_reference

REF_TINY = REFERENCE_DIR / "tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    main(["--preset", "tiny", "--out", str(out), "--seed", "7"])
    return out


def test_config_round_trip(tiny_dir: Path) -> None:
    cfg = read_model_config(tiny_dir)
    assert cfg == tiny_config()
    assert "RANDOM WEIGHTS" in (tiny_dir / "cosyvoice2.yaml").read_text().splitlines()[1]


def test_checkpoints_match_layout_and_are_valid_zips(tiny_dir: Path) -> None:
    layout = expected_layout(tiny_config())
    for name in FILES:
        assert zipfile.ZipFile(tiny_dir / name).testzip() is None  # CRCs patched after streaming
        sd = load_state_dict_file(tiny_dir / name)
        check_strict(name, sd, layout[name])
        assert all(bool(torch.isfinite(v).all()) and v.dtype == torch.float32 for v in sd.values()), name


def test_llm_embedding_tied_and_recipe(tiny_dir: Path) -> None:
    llm = load_state_dict_file(tiny_dir / "llm.pt")
    assert llm[LM_HEAD_KEY].untyped_storage().data_ptr() == llm[EMBED_TOKENS_KEY].untyped_storage().data_ptr()
    dec = llm["llm_decoder.weight"]
    assert dec.std().item() == pytest.approx(3.0 / math.sqrt(dec.shape[1]), rel=0.05)  # gain 3
    hift = load_state_dict_file(tiny_dir / "hift.pt")
    g = hift["conv_post.parametrizations.weight.original0"]
    v = hift["conv_post.parametrizations.weight.original1"]
    assert torch.allclose(g.flatten(), v.flatten(1).norm(dim=1))  # folded weight == v
    alpha = hift["resblocks.0.activations1.0.alpha"]
    assert bool((alpha > 0).all()) and 0.5 < alpha.mean().item() < 1.5


def test_deterministic_per_seed(tiny_dir: Path, tmp_path: Path) -> None:
    layout = expected_layout(tiny_config())["hift.pt"]
    from kernels.weights.make_checkpoint import Recipe, _tensor_fn

    make = _tensor_fn(layout, Recipe(seed=7, hift_upsample_rates=(8, 5, 3)))
    save_streamed(tmp_path / "hift.pt", layout, make, tied={})
    again, first = load_state_dict_file(tmp_path / "hift.pt"), load_state_dict_file(tiny_dir / "hift.pt")
    assert all(torch.equal(again[k], first[k]) for k in layout)
    other = _tensor_fn(layout, Recipe(seed=8, hift_upsample_rates=(8, 5, 3)))("conv_pre.bias")
    assert not torch.equal(other, first["conv_pre.bias"])


def test_blank_en_files(tiny_dir: Path) -> None:
    from safetensors.torch import load_file
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    qdir = tiny_dir / "CosyVoice-BlankEN"
    cfg = json.loads((qdir / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (64, 704, True)
    added = json.loads((qdir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {v["content"]: int(k) for k, v in added.items()} == {t: 640 + i for i, t in enumerate(SPECIALS)}
    vocab = json.loads((qdir / "vocab.json").read_text())
    assert len(vocab) == 640 and sorted(vocab.values()) == list(range(640))
    tok = Tokenizer(models.BPE.from_file(str(qdir / "vocab.json"), str(qdir / "merges.txt")))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    text = "你好，CosyVoice speaks 中文 and English 123!"
    ids = tok.encode(text).ids
    assert max(ids) < 640 and tok.decode(ids) == text
    weights = load_file(str(qdir / "model.safetensors"))
    llm = load_state_dict_file(tiny_dir / "llm.pt")
    assert set(weights) == {k[len("llm.model."):] for k in llm if k.startswith("llm.model.model.")}
    assert not torch.equal(weights["model.norm.weight"], llm["llm.model.model.norm.weight"])  # llm.pt overrides


def test_onnx_stand_ins(tiny_dir: Path) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    camp = ort.InferenceSession(str(tiny_dir / "campplus.onnx"), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in camp.get_inputs()] == ["input"] and [o.name for o in camp.get_outputs()] == ["output"]
    emb = camp.run(None, {"input": np.random.default_rng(0).standard_normal((2, 57, 80)).astype(np.float32)})[0]
    assert emb.shape == (2, 192) and emb.dtype == np.float32 and np.isfinite(emb).all()
    tok = ort.InferenceSession(str(tiny_dir / "speech_tokenizer_v2.onnx"), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in tok.get_inputs()] == ["feats", "feats_length"]
    assert [o.name for o in tok.get_outputs()] == ["indices"]
    for frames in (1, 4, 5, 142):
        feats = (np.random.default_rng(frames).standard_normal((1, 128, frames)) * 0.5).astype(np.float32)
        out = tok.run(None, {"feats": feats, "feats_length": np.array([frames], np.int32)})[0]
        assert out.shape == (1, math.ceil(frames / 4)) and out.dtype == np.int32
        assert out.min() >= 0 and out.max() < 6561


def test_legacy_yaml_reads_same_config(tiny_dir: Path, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_dir / "CosyVoice-BlankEN", legacy / "CosyVoice-BlankEN")
    text = cosyvoice2_yaml(tiny_config(), legacy=True)
    assert "ConditionalDecoder" in text and "CausalConditionalDecoder" not in text and "causal: True" in text
    (legacy / "cosyvoice2.yaml").write_text(text)
    assert read_model_config(legacy) == tiny_config()


def test_manifest_must_describe_full_layout(tmp_path: Path) -> None:
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"files": {"llm.pt": {"keys": {"x": {"shape": [1]}}}}}))
    with pytest.raises(ValueError, match="manifest.json"):
        main(["--manifest", str(bad), "--out", str(tmp_path / "never")])


# ---------------------------------------------------------------- load_model (kernels/weights/model.py)


def _link_copy(src: Path, dst: Path) -> Path:
    """A model dir of symlinks to `src` (cheap); tests replace single files by unlinking first."""
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return dst


def _assert_loaded(model, cfg) -> None:  # type: ignore[no-untyped-def]
    for net in (model.llm, model.flow, model.hift):
        assert not net.training
        tensors = list(net.parameters()) + list(net.buffers())
        assert not any(t.is_meta or t.requires_grad for t in tensors)
    assert model.config == cfg and model.load_stats.seconds > 0 and model.load_stats.memory.rss_mb > 0


def test_load_model_tiny_preset_runs_sanely(tiny_dir: Path) -> None:
    from kernels.networks.flow import fixed_noise
    from kernels.weights.model import load_model

    model = load_model(tiny_dir)
    _assert_loaded(model, tiny_config())
    llm = load_state_dict_file(tiny_dir / "llm.pt")
    assert torch.equal(model.llm.llm_decoder.weight, llm["llm_decoder.weight"])
    assert torch.equal(model.flow.decoder.rand_noise, fixed_noise(80, 15000))  # survives the meta build
    g = torch.Generator().manual_seed(0)
    mel, _ = model.flow.inference(torch.randint(0, 6561, (1, 12), generator=g), torch.tensor([12]),
                                  torch.randn(1, 8, 80, generator=g) * 2 - 5, torch.tensor([8]),
                                  torch.randn(1, 192, generator=g), False, True)
    with torch.inference_mode():
        wav, _ = model.hift.inference(mel, generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(mel).all()) and 0.3 < mel.std().item() < 5
    assert 0.001 < wav.std().item() and (wav.abs() >= 0.99).float().mean().item() < 0.01


@needs_reference("tiny")
def test_load_model_reference_tiny() -> None:
    from kernels.weights.model import load_model

    model = load_model(REF_TINY)
    _assert_loaded(model, read_model_config(REF_TINY))
    flow = load_state_dict_file(REF_TINY / "flow.pt")  # shared-storage windows were cloned apart
    assert torch.equal(model.flow.encoder_proj.weight, flow["encoder_proj.weight"])


def test_load_model_legacy_yaml_and_dtype(tiny_dir: Path, tmp_path: Path) -> None:
    from kernels.weights.model import load_model

    legacy = _link_copy(tiny_dir, tmp_path / "legacy")
    (legacy / "cosyvoice2.yaml").unlink()
    (legacy / "cosyvoice2.yaml").write_text(cosyvoice2_yaml(tiny_config(), legacy=True))
    model = load_model(legacy, llm_dtype=torch.float64)
    assert model.llm.llm_decoder.weight.dtype == torch.float64 and model.hift.conv_pre.weight.dtype == torch.float32


@pytest.mark.parametrize("missing", ["hift.pt", "campplus.onnx", "CosyVoice-BlankEN/merges.txt"])
def test_load_model_names_missing_file(tiny_dir: Path, tmp_path: Path, missing: str) -> None:
    from kernels.weights.model import load_model

    broken = _link_copy(tiny_dir, tmp_path / "broken")
    (broken / missing).unlink()
    with pytest.raises(CheckpointError, match=f"^{missing}: required file missing"):
        load_model(broken)


def test_load_model_names_bad_key(tiny_dir: Path, tmp_path: Path) -> None:
    from kernels.weights.model import load_model

    broken = _link_copy(tiny_dir, tmp_path / "broken")
    flow = {k: v.clone() for k, v in load_state_dict_file(tiny_dir / "flow.pt").items()}
    flow["encoder_proj.bias"] = torch.zeros(81)
    (broken / "flow.pt").unlink()
    torch.save(flow, broken / "flow.pt")
    with pytest.raises(CheckpointError, match=r"^flow\.pt: wrong shape: encoder_proj\.bias \(81,\)"):
        load_model(broken)


def test_generation_shows_a_progress_bar_to_completion(tmp_path: Path) -> None:
    import io

    from kernels.weights.layout import expected_layout, tiny_config
    from kernels.weights.make_checkpoint import write_model_dir

    bar, lines = io.StringIO(), []
    cfg = tiny_config()
    write_model_dir(tmp_path, cfg, expected_layout(cfg), 1, log=lines.append, progress_file=bar)
    assert "random weights: 100%" in bar.getvalue() and "16.2M/16.2M" in bar.getvalue()
    assert any(line.startswith("wrote llm.pt") for line in lines)


def test_loading_shows_a_progress_bar_over_the_three_files(tiny_model_dir: Path) -> None:
    import io

    from kernels.weights.model import load_model

    bar = io.StringIO()
    load_model(tiny_model_dir, progress_file=bar)
    total = sum((tiny_model_dir / f).stat().st_size for f in ("llm.pt", "flow.pt", "hift.pt"))
    assert "loading weights: 100%" in bar.getvalue() and f"{total / 1e6:.1f}M/{total / 1e6:.1f}M" in bar.getvalue()
