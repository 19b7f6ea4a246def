"""The cache a flow layer's step reads and extends: one forward for the full pass and the streaming one.

Every layer with state across frames has a step on new frames: a causal conv's `step(x, tail, ends)`
returns its output and the next left context; an attention's `step(x, mask, ..., kv)` extends each
request's keys/values and attends over them. Container layers (resnet and transformer blocks, conformer
layers, the encoder, the U-Net) take a `StepCache` and hand each child its entry. The full pass uses the
same code with `NO_CACHE`: every frame is new, the left context is zeros, there are no earlier keys.

A `StepCache` covers one pass over a batch of streaming requests (the encoder, or one Euler step of the
estimator): it maps each layer (the module itself is the key) to that layer's entry for the batch, and
says which batch rows belong to which request (`Segment`). Where the entries live per request and how
they are batched is its owner's business (kernels/runtime/flow_cache.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Segment:
    """One request's part of a cached step: batch rows `rows`, new frames at absolute [start, start+new)."""

    rows: slice  # a strided slice in the estimator: the request's cond and uncond CFG rows
    start: int
    new: int  # the batch is right padded beyond


class KVStore(Protocol):
    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values `(rows, H, new, d)` along time; return all of them so far."""
        ...


class StepCache(Protocol):
    segments: Sequence[Segment]
    ends: Tensor | None  # (R,) long: per batch row, the new frames the cache keeps (the next call's left
    # context ends there): all valid ones, or fewer when a call's cache stops short of its end

    def tail(self, layer: nn.Module) -> Tensor | None:
        """The layer's left context `(R, C, w)` for the batch (zeros for rows without one); None if no row has one."""
        ...

    def keep_tail(self, layer: nn.Module, tail: Tensor) -> None:
        """Store the layer's new left context `(R, C, w)` (each row's last w valid input frames)."""
        ...

    def kv(self, layer: nn.Module) -> list[tuple[Segment, KVStore]] | None:
        """Each segment with the layer's key/value store for it."""
        ...

    def scaled(self, factor: int) -> StepCache:
        """The same requests after an upsampling by `factor` (starts and lengths scaled)."""
        ...


class _NoCache:
    """The full pass: nothing cached, nothing kept."""

    segments: tuple[Segment, ...] = ()
    ends = None

    def tail(self, layer: nn.Module) -> Tensor | None:
        return None

    def keep_tail(self, layer: nn.Module, tail: Tensor) -> None:
        pass

    def kv(self, layer: nn.Module) -> list[tuple[Segment, KVStore]] | None:
        return None

    def scaled(self, factor: int) -> _NoCache:
        return self


NO_CACHE: StepCache = _NoCache()  # type: ignore[assignment]


def with_left(x: Tensor, tail: Tensor | None, width: int) -> Tensor:
    """`(R, C, T)` -> `(R, C, width + T)`: the cached left context, or zeros (a causal conv's left pad)."""
    if width == 0:
        return x
    if tail is None:
        return torch.nn.functional.pad(x, (width, 0))
    return torch.cat([tail.to(x.dtype), x], dim=2)


def last_frames(full: Tensor, ends: Tensor | None, width: int) -> Tensor:
    """Each row's last `width` valid frames of `full` `(R, C, width + T)` (a left context then new frames):
    the left context of the next call, which starts at row b's new frame ends[b]; None: after all T."""
    if ends is None:
        return full[:, :, full.size(2) - width :]
    idx = ends.view(-1, 1, 1) + torch.arange(width, device=full.device).view(1, 1, -1)
    return torch.gather(full, 2, idx.expand(-1, full.size(1), -1))


def conv_step(layer: nn.Module, cache: StepCache, x: Tensor, *args: Tensor) -> Tensor:
    """Run a stateful conv layer's `step(x, *args, tail, ends)` on new frames with its cached left context
    and keep the context for the next call."""
    y, tail = layer.step(x, *args, tail=cache.tail(layer), ends=cache.ends)
    cache.keep_tail(layer, tail)
    return y
