"""Writing a bench tool's results: its JSON (`--json`) and its Markdown table (`--markdown`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, result: Any, indent: int = 2, ensure_ascii: bool = True) -> None:
    path.write_text(json.dumps(result, indent=indent, ensure_ascii=ensure_ascii) + "\n")


def write_results(result: Any, text: str, json_path: Path | None, markdown_path: Path | None,
                  indent: int = 2) -> None:
    """Each output whose path was given: the result as JSON, the Markdown text as is."""
    if json_path:
        write_json(json_path, result, indent)
    if markdown_path:
        markdown_path.write_text(text)
