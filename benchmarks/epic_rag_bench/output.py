"""Where a one-shot benchmark leaves its result: `results.json` in its --out folder, its table printed."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(out: Path, result: dict, table: str) -> None:
    """Write `result` to out/results.json and print `table` and where the JSON went."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(table)
    print(f"wrote {out / 'results.json'}")
