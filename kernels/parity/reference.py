"""Where the upstream reference fixtures are: `$COSYSERVE_REFERENCE_DIR`, else `../shared/reference`
beside the repository. They are not part of this repository: they come with the project's shared
folder (a tiny random-weight model in the released layout + upstream's outputs on it)."""
from __future__ import annotations

import os
from pathlib import Path

ENV = "COSYSERVE_REFERENCE_DIR"
REPO = Path(__file__).resolve().parents[2]


def reference_dir() -> Path:
    return Path(os.environ[ENV]) if os.environ.get(ENV) else REPO.parent / "shared" / "reference"


def missing_message(path: Path) -> str:
    return (f"{path} does not exist. The reference fixtures (a folder holding tiny/ and cases/) are not "
            f"in this repository: they come with the project's shared/ folder, looked for at "
            f"../shared/reference beside the checkout; set {ENV}=DIR, or pass --model-dir and --cases")
