"""Benchmarks: each prints a table and writes its result as JSON (baselines measured in the same run)."""
import json
from pathlib import Path


def write_result(result: dict, out_json: str | None, echo=print) -> None:
    """Write a benchmark's result to `out_json` (parent folders made); nothing when it is None."""
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2))
        echo(f"wrote {out_json}")
