"""What this CPU can do fast, read once at start-up from /proc/cpuinfo (Linux): torch-free.

bf16 weights pay only where the CPU multiplies bf16 natively (AVX512-BF16 `vdpbf16ps`, or AMX tiles):
there the full-size flow runs ~2x faster than fp32. Elsewhere (AVX2-only CPUs) oneDNN emulates bf16
and the same matmuls are up to ~100x slower, so fp32 is the only sane choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuFeatures:
    name: str  # "model name", e.g. "AMD EPYC 9B14"
    flags: frozenset[str]

    @property
    def amx_bf16(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX)."""
        return "avx512_bf16" in self.flags or self.amx_bf16

    def summary(self) -> str:
        """The name and the widest vector units, for the start-up log."""
        units = [label for flag, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"),
                                           ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in self.flags]
        return f"{self.name or 'unknown CPU'} ({', '.join(units) or 'no AVX2'})"


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The first processor's model name and flags (every core of a machine has the same)."""
    name, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if name and flags:
            break
    return CpuFeatures(name, flags)


def read_cpu_features(path: Path = CPUINFO) -> CpuFeatures:
    """This machine's CPU; no flags when /proc/cpuinfo is not there (not Linux): fp32 is then chosen."""
    try:
        return parse_cpuinfo(path.read_text(errors="replace"))
    except OSError:
        return CpuFeatures("", frozenset())
