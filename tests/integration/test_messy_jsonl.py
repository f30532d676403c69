"""A real job over a messy JSONL crawl dump: every line comes back once, a bad one with its error and line."""
import gzip
import json
import re

import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.engine.predictor import Predictor
from pipeline.offline.job import JobError, run_job

SENTENCES = ["a great film", "dull and long", "the acting is superb", "I walked out", "not bad at all",
             "a masterpiece of boredom", "fun for the whole family", "the plot makes no sense"]
# physical line -> what is there instead of a good record, and the error it must come back with
BAD = {
    4: (b'{"rid": "r4", "text": "cut off', "line 4: not valid JSON (Unterminated string starting at: column 23)"),
    9: (b'{"rid": "r9", "text": 12, "line": 9}', "line 9: text is int, not a string; convert it to str first"),
    13: (b'{"rid": "r13", "body": "no text", "line": 13}', "line 13: no 'text' field"),
    17: (b'["a", "list"]', "line 17: not a JSON object but an array"),
    22: (b'{"rid": "r22", "text": ["a"], "line": 22}', "line 22: text is list, not a string; convert it to str first"),
    26: (b'{"rid": "r26", "text": "", "line": 26}', "text is empty or whitespace only; supply a non-empty string"),
    29: (b'{"rid": "r29", "text": null, "line": 29}', "text is null; supply a non-empty string"),
    33: (b"{'rid': 'r33'}", "line 33: not valid JSON (Expecting property name enclosed in double quotes: column 2)"),
}
BLANK = {7, 20, 38}
LINES = 40


def _messy(path):
    lines, good = [], {}
    for n in range(1, LINES + 1):
        if n in BAD:
            lines.append(BAD[n][0])
        elif n in BLANK:
            lines.append(b"  " if n == 20 else b"")
        else:
            good[n] = f"{SENTENCES[n % len(SENTENCES)]} ({n})"
            rid = None if n == 11 else f"r{n}"  # a null id is a row like any other
            lines.append(json.dumps({"rid": rid, "text": good[n], "line": n}).encode())
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return good


def _cfg(model, inp, out, **input_kw):
    return JobConfig.model_validate({
        "model": model,
        "input": {"url": str(inp), "text_column": "text", "id_column": "rid", "passthrough": ["line"],
                  "rows_per_shard": 8, **input_kw},
        "output": {"url": str(out)},
        "actors": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "tokenize_cpus": 0.25, "wait_for_actors_s": 180},
        "controller": {"enabled": False},  # the artifact's thresholds: answers equal the local predictor's
        "certify": {"enabled": False},
    })


def test_messy_jsonl_every_line_once_bad_ones_with_their_error_and_line(ray_session, tiny_artifact, tmp_path):
    good = _messy(tmp_path / "dump.jsonl.gz")
    summary = run_job(_cfg(tiny_artifact, tmp_path / "dump.jsonl.gz", tmp_path / "out"))
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()

    def line_of(r):  # a record keeps its `line` column; a line that is no record says its line in the error
        return r["line"] if r["line"] is not None else int(re.match(r"line (\d+):", r["error"]).group(1))

    by_line = {}
    for r in rows:
        assert line_of(r) not in by_line, f"line {line_of(r)} twice"
        by_line[line_of(r)] = r
    assert sorted(by_line) == [n for n in range(1, LINES + 1) if n not in BLANK]  # every non-blank line, once
    assert {n: by_line[n]["error"] for n in BAD} == {n: e for n, (_, e) in BAD.items()}
    assert all(by_line[n]["label"] is None for n in BAD)
    assert by_line[9]["id"] == "r9" and by_line[4]["id"] is None and by_line[11]["id"] is None

    local = Predictor(tiny_artifact).predict(list(good.values()))
    for n, p in zip(good, local.predictions):
        r = by_line[n]
        assert r["error"] is None and (r["label"], r["exit_layer"]) == (p.label, p.exit_layer), n

    assert summary["rows"] == summary["rows_total"] == LINES - len(BLANK) and summary["errors"] == len(BAD)
    assert summary["errors_by_kind"] == {"empty_text": 1, "malformed_json": 2, "missing_text": 1, "not_an_object": 1,
                                         "null_text": 1, "text_not_string": 2}

    # `offramp verify` finds each answered row's text in the messy file (rows are the tolerant reader's)
    from pipeline.offline.verify import verify

    report = verify(str(tmp_path / "out"), echo=lambda *a: None)
    assert report["rows_output"] == LINES - len(BLANK) and report["rows_checked"] == len(good)


def test_messy_jsonl_strict_fails_up_front_and_no_text_anywhere_is_a_config_error(ray_session, tiny_artifact,
                                                                                  tmp_path):
    _messy(tmp_path / "dump.jsonl.gz")
    with pytest.raises(JobError, match=r"cannot read input: cannot read .*dump.jsonl.gz' as jsonl: .*JSON parse error"):
        run_job(_cfg(tiny_artifact, tmp_path / "dump.jsonl.gz", tmp_path / "out", strict=True))
    (tmp_path / "body.jsonl").write_text('{"body": "a"}\nnot json\n{"body": "b"}\n')
    with pytest.raises(JobError, match=r"no column 'text' \(columns: \['body'\]\)"):
        run_job(_cfg(tiny_artifact, tmp_path / "body.jsonl", tmp_path / "out2"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
