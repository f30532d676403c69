"""`offramp bench report`: the docs table is written from result JSON, between its markers, reproducibly."""
import json
from pathlib import Path

import pytest

from pipeline.bench.report import BEGIN, END, render, write_into

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_report_reads_the_committed_results_and_rewrites_only_its_block(tmp_path):
    table = render(str(DOCS / "results"))  # the JSON docs/benchmarks.md was written from, in the repository
    assert "| offline job: 50000 rows, 2 CPUs | 309.9 rows/s | 114.6 rows/s (Ray Data docs) | 2.70x |" in table
    assert "AVX512-VNNI" in table and "accuracy: nyt-editorials" in table and "calibration (replayed): tweets" in table
    doc = tmp_path / "bench.md"
    doc.write_text(f"# intro\n\n{BEGIN}\nstale\n{END}\n\n## history\nkept\n")
    write_into(str(doc), table)
    text = doc.read_text()
    assert "stale" not in text and table in text and text.endswith("## history\nkept\n")
    write_into(str(doc), table)
    assert doc.read_text() == text  # idempotent
    assert (DOCS / "benchmarks.md").read_text().count(table) == 1  # the committed page is the command's output


def test_report_says_what_to_run_when_there_are_no_results(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(FileNotFoundError, match="offramp bench"):
        render(str(tmp_path))


def test_a_pruning_result_reads_as_one_line_per_pruned_artifact_at_full_depth():
    from pipeline.bench.report import headlines

    row = {"dtype": "float32", "heads": 0.0, "agreement": 0.97, "accuracy": 0.84, "mean_exit_layer": None}
    result = {"source": "a/ee", "pruned": ["a/ee-ffn50"], "rows": 2113, "dataset": "movie-reviews:test", "rows_table": [
        dict(row, artifact="a/ee", mode="full", ffn=0.0, rows_per_s=100.0, vs_unpruned=1.0, agreement=1.0),
        dict(row, artifact="a/ee-ffn50", mode="full", ffn=0.5, rows_per_s=131.0, vs_unpruned=1.31),
        dict(row, artifact="a/ee-ffn50", mode="exits", ffn=0.5, rows_per_s=300.0, vs_unpruned=1.1)]}
    [line] = headlines(result)
    assert line["benchmark"].startswith("pruning: ee-ffn50 (50% of feed-forward neurons")
    assert line["ratio"] == "1.31x" and line["accuracy"] == "agreement with the original 97.00%"


def test_an_online_result_sets_each_offramp_app_beside_every_plain_peer_and_the_serve_floor():
    from pipeline.bench.report import headlines

    run = {"fraction_of_plain_capacity": 0.5, "offered_rps": 50.0, "p99_ms": 200.0, "errors": 0}
    result = {"plain": {}, "runs": [dict(run, app="plain", p50_ms=80.0), dict(run, app="plain-bf16", p50_ms=60.0),
                                    dict(run, app="offramp-exit", p50_ms=40.0)],
              "capacity_rps": {"plain": 100.0, "plain-bf16": 150.0, "offramp-exit": 120.0, "serve-floor": 250.0}}
    lines = headlines(result)
    assert [x["benchmark"].split(":")[0] for x in lines] == ["online", "online capacity"]  # peers are not offramp
    assert lines[0]["ratio"] == "p50 2.00x lower" and lines[0]["baseline"].endswith("; plain-bf16 p50 60 ms")
    cap = lines[1]
    assert cap["ratio"] == "1.20x plain, 0.80x plain-bf16"
    assert cap["baseline"] == "plain 100.0 req/s, plain-bf16 150.0 req/s (Serve alone, no model: 250.0)"
