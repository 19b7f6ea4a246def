"""The synthesis modes the engine knows, in the bottom layer so protocol and scheduler share them."""
from __future__ import annotations

import enum


class Mode(str, enum.Enum):
    ZERO_SHOT = "zero_shot"  # API fast_replication
    CROSS_LINGUAL = "cross_lingual"  # API cross_lingual_replication
    INSTRUCT = "instruct"  # API natural_language_replication (instruct2 layout)
