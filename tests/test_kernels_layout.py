"""expected_layout against the released manifest (full dims) and the reference tiny checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from kernels.config import read_model_config
from kernels.weights.layout import FILES, expected_layout, full_config, numel, tiny_config, unique_numel
from tests.conftest import REFERENCE_DIR, needs_reference

REF = REFERENCE_DIR
needs_ref = needs_reference("manifest-0.5b.json", "tiny")


@needs_ref
@pytest.mark.parametrize("file_name", FILES)
def test_full_layout_equals_manifest(file_name: str) -> None:
    manifest = json.loads((REF / "manifest-0.5b.json").read_text())["files"][file_name]
    ours = expected_layout(full_config())[file_name]
    ref = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
    assert list(ours) == list(ref)  # same keys in the same (state_dict) order
    assert ours == ref
    assert len(ours) == manifest["n_keys"]
    assert numel(ours) == manifest["state_dict_numel"]
    assert unique_numel(file_name, ours) == manifest["unique_param_numel"]


def test_full_layout_spec_numbers() -> None:
    layout = expected_layout(full_config())
    assert (len(layout["llm.pt"]), len(layout["flow.pt"]), len(layout["hift.pt"])) == (295, 1121, 328)
    assert unique_numel("llm.pt", layout["llm.pt"]) == 505_803_812
    assert numel(layout["flow.pt"]) == 112_549_360
    assert numel(layout["hift.pt"]) == 20_821_295


@needs_ref
def test_tiny_layout_equals_reference_files() -> None:
    cfg = read_model_config(REF / "tiny")
    assert cfg == tiny_config()
    layout = expected_layout(cfg)
    for file_name in FILES:
        sd = torch.load(REF / "tiny" / file_name, weights_only=True, mmap=True)
        assert {k: tuple(v.shape) for k, v in sd.items()} == layout[file_name], file_name
