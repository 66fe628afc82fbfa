"""Where a benchmark leaves its figures: OUT/STEM.json (every number, for scripts) beside OUT/STEM.md (the table a
reader opens), the table also printed. One place, so every benchmark writes the pair the same way."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, stem: str, data: dict, md: str, indent: int = 1) -> Path:
    """Write data as STEM.json and md as STEM.md in out (made if missing), print md, return the .md's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=indent) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(md)
    return out / f"{stem}.md"
