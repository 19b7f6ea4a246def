"""Reading released state-dict files and checking them strictly against `kernels.weights.layout`.

Every failure is a `CheckpointError` whose message starts with the file name and names the
offending key(s), so a bad model directory is diagnosed from one line of a log.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

Shape = tuple[int, ...]
GENERATOR_PREFIX = "generator."  # HiFiGan-wrapper checkpoints; upstream strips it for hift
_LEGACY_WN = {".weight_g": ".parametrizations.weight.original0", ".weight_v": ".parametrizations.weight.original1"}
MAX_LISTED = 5  # offenders named per category in one error


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not match the expected layout."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load a plain state dict, memory-mapped (pages are read on first touch, no copy)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.name}: file not found ({path})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "zipfile" not in str(exc) and "mmap" not in str(exc):
            raise CheckpointError(f"{path.name}: cannot load ({exc})") from exc
        obj = _load_legacy(path)  # pre-1.6 serialization cannot be memory-mapped
    except Exception as exc:  # pickle/zip errors of a corrupt or non-torch file
        raise CheckpointError(f"{path.name}: cannot load ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path.name}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path.name}: non-tensor entries, e.g. key {bad[0]!r}")
    return dict(obj)


def _load_legacy(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path.name}: cannot load ({type(exc).__name__}: {exc})") from exc


def canonical_key(key: str) -> str:
    """Map equivalent hift namings onto the release naming: no `generator.`, parametrizations."""
    key = key.removeprefix(GENERATOR_PREFIX)
    for legacy, new in _LEGACY_WN.items():
        if key.endswith(legacy):
            return key[: -len(legacy)] + new
    return key


def canonicalize(file_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys with `canonical_key`; two keys landing on one name is an error."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = canonical_key(key)
        if new in out:
            raise CheckpointError(f"{file_name}: keys {origin[new]!r} and {key!r} both mean {new!r}")
        out[new] = value
        origin[new] = key
    return out


def _listing(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" ... (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def check_strict(
    file_name: str,
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, Shape],
    ignore: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Raise CheckpointError unless keys and shapes equal `expected` exactly (after canonical naming).

    `ignore` names expected keys that may be absent or present (either way they are dropped).
    Returns the state dict with canonical key names, `ignore`d keys removed.
    """
    ignored = set(ignore)
    sd = canonicalize(file_name, state_dict)
    missing = [k for k in expected if k not in sd and k not in ignored]
    unexpected = [k for k in sd if k not in expected and k not in ignored]
    wrong = [
        f"{k} {tuple(sd[k].shape)} != expected {tuple(expected[k])}"
        for k in expected
        if k in sd and k not in ignored and tuple(sd[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shape: {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"{file_name}: " + "; ".join(problems))
    return {k: v for k, v in sd.items() if k not in ignored}


def clone_shared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every tensor its own storage where several tensors share one (tied weights, the tiny
    flow.pt windows): safetensors refuses shared storage and aliasing parameters would surprise
    in-place updates. Tensors that already own their whole storage are passed through untouched."""
    users: dict[int, int] = {}
    for value in state_dict.values():
        ptr = value.untyped_storage().data_ptr()
        users[ptr] = users.get(ptr, 0) + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        storage = value.untyped_storage()
        whole = storage.nbytes() == value.numel() * value.element_size()
        out[key] = value if users[storage.data_ptr()] == 1 and whole else value.clone()
    return out
