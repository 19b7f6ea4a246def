"""Record where a GPU run happened: RESULTS_DIR/env.json (+ nvidia-smi.txt when nvidia-smi exists).

    python -m bench.gpu.env RESULTS_DIR

Card name, driver, GPU memory, torch and its CUDA version, Python, missing modules, commit (COMMIT in the environment
wins: a copied checkout may have no .git), CPU, date. Works without torch or a card (fields are null).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from bench.provenance import commit, cpu_name, now_iso


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def nvidia(out: Path) -> dict[str, object]:
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": False}
    full = _run(["nvidia-smi"])
    if full is not None:
        (out / "nvidia-smi.txt").write_text(full)
    query = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    cards = [[x.strip() for x in line.split(",")] for line in (query or "").splitlines() if line.strip()]
    info: dict[str, object] = {"nvidia_smi": True, "gpus": [c[0] for c in cards]}
    if cards and len(cards[0]) >= 3:
        info.update(card=cards[0][0], driver=cards[0][1], gpu_memory=cards[0][2])
    return info


def torch_info() -> dict[str, object]:
    try:
        import torch
    except ImportError as exc:
        return {"torch": None, "torch_error": str(exc)}
    cuda = torch.cuda.is_available()
    info: dict[str, object] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            torch_device=torch.cuda.get_device_name(0),
            torch_device_mb=round(props.total_memory / 2**20),
            capability=f"{props.major}.{props.minor}",
            device_count=torch.cuda.device_count(),
        )
    try:
        from kernels.networks.attention import flash_attn_available

        info["flash_attn"] = bool(flash_attn_available())
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal
        info["flash_attn"] = f"unknown: {exc}"
    return info


MODULES = ("torch", "numpy", "h11", "wsproto", "uvloop", "requests", "websocket", "soundfile", "soxr",
           "onnxruntime", "tokenizers", "lameenc", "yaml", "pytest", "matplotlib")


def missing_modules() -> list[str]:
    """What the checks import but this Python lacks (the card has no registry: install.sh's wheels)."""
    return [m for m in MODULES if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    env: dict[str, object] = {
        "date": now_iso(),
        "commit": os.environ.get("COMMIT") or commit(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "allow_cpu": os.environ.get("ALLOW_CPU") == "1",
        "missing_modules": missing_modules(),
        **nvidia(out),
        **torch_info(),
    }
    env.setdefault("card", env.get("torch_device") or "none (CPU)")
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps(env, indent=1))
    return env


if __name__ == "__main__":
    main()
