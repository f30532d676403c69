"""Benchmarks: each prints a table and writes its result as JSON (baselines measured in the same run), stamped
with the machine it ran on and the command that ran it; `offramp bench report` renders them (report.py)."""
import json
import os
import sys
from pathlib import Path


def machine() -> str:
    """The CPU, its core count and whether it has AVX512-VNNI (int8 speed depends on it), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"unknown CPU, {os.cpu_count()} cores"
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    words = set(flags.split())
    kind = "AVX512-VNNI" if "avx512_vnni" in words else "AVX2 only"
    fast = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if flag in words]
    return f"{model}, {os.cpu_count()} cores, {kind}" + (f", {' and '.join(fast)}" if fast else "")


def write_result(result: dict, out_json: str | None, echo=print) -> None:
    """Write a benchmark's result to `out_json` (parent folders made), with the machine and the command line;
    nothing when `out_json` is None."""
    if out_json:
        result.setdefault("machine", machine())
        result.setdefault("command", "offramp " + " ".join(sys.argv[1:]))
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2))
        echo(f"wrote {out_json}")


def timed_job(cfg, out, tag: str, **sections: dict) -> tuple[dict, float]:
    """A bench's run of a job: `cfg` writing to `out` with a fresh controller (no checkpoint, named for this
    process and `tag`), `sections` (a config section -> the fields to set) applied; its summary and wall seconds."""
    import time

    from pipeline.offline.job import run_job

    update = {"output": cfg.output.model_copy(update={"url": str(out)}),
              "controller": cfg.controller.model_copy(update={"checkpoint_url": None,
                                                              "name": f"bench-{os.getpid()}-{tag}"})}
    update.update({name: getattr(cfg, name).model_copy(update=fields) for name, fields in sections.items()})
    t = time.perf_counter()
    summary = run_job(cfg.model_copy(update=update), echo=lambda m: None)
    return summary, time.perf_counter() - t
