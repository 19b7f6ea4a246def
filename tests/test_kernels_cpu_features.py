"""Reading the CPU's features from /proc/cpuinfo text."""
from __future__ import annotations

from pathlib import Path

from kernels.runtime.cpu_features import parse_cpuinfo, read_cpu_features

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni
"""
ZEN2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx2 fma\n"
SPR = "processor : 0\nmodel name : Intel(R) Xeon(R) Platinum 8481C\nflags : avx2 avx512f amx_tile amx_bf16 amx_int8\n"


def test_zen4_multiplies_bf16_natively() -> None:
    cpu = parse_cpuinfo(ZEN4)
    assert cpu.name == "AMD EPYC 9B14" and cpu.native_bf16 and not cpu.amx_bf16
    assert cpu.summary() == "AMD EPYC 9B14 (AVX512-BF16, AVX-512, AVX2)"


def test_amx_counts_as_native_bf16() -> None:
    cpu = parse_cpuinfo(SPR)
    assert cpu.amx_bf16 and cpu.native_bf16 and cpu.summary().startswith("Intel(R) Xeon(R) Platinum 8481C (AMX-BF16")


def test_avx2_only_is_not() -> None:
    cpu = parse_cpuinfo(ZEN2)
    assert not cpu.native_bf16 and cpu.summary() == "AMD EPYC 7B12 (AVX2)"


def test_no_cpuinfo_means_no_features(tmp_path: Path) -> None:
    cpu = read_cpu_features(tmp_path / "absent")
    assert not cpu.native_bf16 and cpu.summary() == "unknown CPU (no AVX2)"


def test_this_machine_is_read() -> None:
    cpu = read_cpu_features()
    if Path("/proc/cpuinfo").exists():
        assert cpu.flags and cpu.summary()
