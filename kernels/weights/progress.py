"""Progress bars for the slow start-up steps (checkpoint generation, weight loading, warm-up).

Shown on a terminal only (tqdm's `disable=None`): a log file or CI output gets the steps' own
one-line summaries instead of carriage-return noise. Tests pass `file=` to see the bar.
"""
from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm


def progress(total: float, desc: str, unit: str = "it", unit_scale: bool = False,
             file: IO[str] | None = None) -> tqdm[Any]:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=file or sys.stderr,
                disable=None if file is None else False, dynamic_ncols=True, mininterval=0.25, leave=True)
