"""Strict checkpoint checks: every error names the file and the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels.weights.checkpoint import CheckpointError, check_strict, clone_shared, load_state_dict_file

EXPECTED = {
    "conv_pre.bias": (4,),
    "conv_pre.parametrizations.weight.original0": (4, 1, 1),
    "conv_pre.parametrizations.weight.original1": (4, 2, 3),
    "classifier.weight": (1, 4),
}


def _state() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in EXPECTED.items()}


def test_exact_match_passes_and_keeps_order() -> None:
    assert list(check_strict("hift.pt", _state(), EXPECTED)) == list(EXPECTED)


def test_missing_key_named() -> None:
    sd = _state()
    del sd["classifier.weight"]
    with pytest.raises(CheckpointError, match=r"^hift\.pt: missing key\(s\): classifier\.weight$"):
        check_strict("hift.pt", sd, EXPECTED)


def test_unexpected_key_named() -> None:
    sd = _state() | {"extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"^hift\.pt: unexpected key\(s\): extra\.weight$"):
        check_strict("hift.pt", sd, EXPECTED)


def test_wrong_shape_named() -> None:
    sd = _state() | {"conv_pre.bias": torch.zeros(5)}
    with pytest.raises(CheckpointError, match=r"^hift\.pt: wrong shape: conv_pre\.bias \(5,\) != expected \(4,\)$"):
        check_strict("hift.pt", sd, EXPECTED)


def test_all_problems_in_one_error_with_cap() -> None:
    expected = {f"k{i}": (1,) for i in range(9)}
    with pytest.raises(CheckpointError) as info:
        check_strict("flow.pt", {"x": torch.zeros(1)}, expected)
    msg = str(info.value)
    assert msg.startswith("flow.pt: missing key(s): k0, k1, k2, k3, k4 ... (+4 more); unexpected key(s): x")


def test_legacy_weight_norm_and_generator_prefix_accepted() -> None:
    sd = {
        "generator.conv_pre.bias": torch.zeros(4),
        "generator.conv_pre.weight_g": torch.ones(4, 1, 1),
        "generator.conv_pre.weight_v": torch.zeros(4, 2, 3),
        "generator.classifier.weight": torch.zeros(1, 4),
    }
    out = check_strict("hift.pt", sd, EXPECTED)
    assert set(out) == set(EXPECTED)
    assert torch.equal(out["conv_pre.parametrizations.weight.original0"], torch.ones(4, 1, 1))


def test_two_namings_of_one_key_rejected() -> None:
    sd = _state() | {"conv_pre.weight_g": torch.zeros(4, 1, 1)}
    with pytest.raises(CheckpointError, match="conv_pre.weight_g"):
        check_strict("hift.pt", sd, EXPECTED)


def test_ignore_drops_key() -> None:
    sd = _state() | {"lm_head.weight": torch.zeros(2)}
    out = check_strict("llm.pt", sd, EXPECTED | {"lm_head.weight": (2,)}, ignore=("lm_head.weight",))
    assert "lm_head.weight" not in out


def test_missing_file_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^flow\.pt: file not found"):
        load_state_dict_file(tmp_path / "flow.pt")


def test_unreadable_file_named(tmp_path: Path) -> None:
    (tmp_path / "llm.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"^llm\.pt: cannot load"):
        load_state_dict_file(tmp_path / "llm.pt")


def test_non_tensor_entry_named(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(1), "b": 3}, tmp_path / "hift.pt")
    with pytest.raises(CheckpointError, match=r"^hift\.pt: non-tensor entries, e\.g\. key 'b'"):
        load_state_dict_file(tmp_path / "hift.pt")


def test_round_trip_and_clone_shared(tmp_path: Path) -> None:
    base = torch.arange(10, dtype=torch.float32)
    tied = torch.randn(3, 2)
    sd = {"window": base[2:6], "rest": base[6:], "tied_a": tied, "tied_b": tied, "own": torch.ones(2)}
    torch.save(sd, tmp_path / "x.pt")
    loaded = load_state_dict_file(tmp_path / "x.pt")
    assert loaded["tied_a"].untyped_storage().data_ptr() == loaded["tied_b"].untyped_storage().data_ptr()
    out = clone_shared(loaded)
    assert out["own"] is loaded["own"]
    ptrs = {k: v.untyped_storage().data_ptr() for k, v in out.items()}
    assert len(set(ptrs.values())) == len(ptrs)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
