"""What a curation job keeps, on a real local Ray: `output.probabilities` (a `prob_<label>` column per label) and
`output.filter` (labels / min_score; rows with an error always kept) in a certified job; the certificate still
counts every answer, `offramp verify` reads the filtered parts by their `row` column, and `--resume` on a filtered
output redoes only the missing shards.

The job runs without calibration and without a controller (the artifact's thresholds throughout, audited), so its
answers equal the local Predictor's and the rows the filter must remove are known here."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import EngineConfig
from pipeline.engine.policy import ExitPolicy
from pipeline.engine.predictor import Predictor
from pipeline.offline import sink
from pipeline.offline.job import run_job
from pipeline.offline.verify import verify
from tests.integration.test_offline_job import SENTENCES, _cfg

ROWS, FILES = 300, 3
BAD = {7: None, 150: "", 151: "   ", 299: None}  # global row -> an unusable text (a row with an error)


def _write_input(path) -> tuple[list[str], list]:
    """(ids, texts) of ROWS rows in FILES parquet files, the BAD rows among them."""
    path.mkdir(parents=True)
    texts = [BAD.get(i, f"{SENTENCES[i % len(SENTENCES)]} ({i})") for i in range(ROWS)]
    ids = [f"r{i}" for i in range(ROWS)]
    per = ROWS // FILES
    for f in range(FILES):
        sl = slice(f * per, (f + 1) * per)
        pq.write_table(pa.table({"rid": ids[sl], "text": pa.array(texts[sl], pa.string())}), path / f"part-{f}.parquet")
    return ids, texts


def _cut(values: np.ndarray) -> float:
    """A min_score near the median of `values` in the widest gap around it (no row sits on the cut)."""
    v = np.sort(values)
    mid = len(v) // 2
    k = max(range(mid - 5, mid + 5), key=lambda i: v[i + 1] - v[i])
    return float((v[k] + v[k + 1]) / 2)


def _parts(out) -> dict[str, int]:
    return {p: os.stat(out / p).st_mtime_ns for p in sorted(os.listdir(out)) if sink.PART.search(p)}


def test_probabilities_and_filter_certified_verified_and_resumed(ray_session, tiny_artifact, tmp_path):
    ids, texts = _write_input(tmp_path / "in")
    good = [i for i in range(ROWS) if i not in BAD]
    local = Predictor(tiny_artifact, EngineConfig(dtype="float32"))
    L = local.model.num_layers
    answers = dict(zip(good, local.predict([texts[i] for i in good]).predictions))
    label = max({"class0", "class1"}, key=lambda c: sum(p.label == c for p in answers.values()))  # the commoner
    min_score = _cut(np.array([p.score for p in answers.values() if p.label == label]))
    kept = {ids[i] for i in BAD} | {ids[i] for i, p in answers.items() if p.label == label and p.score >= min_score}
    assert 20 < len(kept) < ROWS - 20

    cfg = _cfg(tiny_artifact, tmp_path / "in", tmp_path / "out", input={"passthrough": []},
               controller={"enabled": False}, engine={"dtype": "float32"},
               output={"probabilities": True, "filter": {"labels": [label], "min_score": min_score}},
               certify={"enabled": True, "calibrate": False, "audit_fraction": 0.5, "top_up": False,
                        "on_uncertified": "warn"})
    summary = run_job(cfg, echo=lambda *_: None)
    table = pq.read_table(str(tmp_path / "out"))
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(kept)  # exactly the rows that pass, and every error row
    assert summary["filtered_out"] == ROWS - len(kept) and summary["errors"] == len(BAD)
    for r in rows:
        i = int(r["id"][1:])
        if i in BAD:
            assert r["error"] and r["label"] is None and r["prob_class0"] is None and r["prob_class1"] is None
            continue
        assert (r["label"], r["label_id"], r["exit_layer"]) == (answers[i].label, answers[i].label_id,
                                                                 answers[i].exit_layer)
        assert r["prob_class0"] + r["prob_class1"] == pytest.approx(1.0, abs=1e-5)  # a softmax over the labels
        assert r[f"prob_{r['label']}"] == pytest.approx(r["score"], abs=1e-5)
    # `row`: each kept row's position in its shard, which names its input row through the job's plan
    plan = json.loads((tmp_path / "out" / "_offramp_plan.json").read_text())["shards"]
    start = {s["shard"]: (int(s["path"].rsplit("part-", 1)[1].split(".")[0]) * (ROWS // FILES) + s["start"])
             for s in plan}
    for name in _parts(tmp_path / "out"):
        part = pq.read_table(tmp_path / "out" / name).to_pydict()
        shard = int(sink.PART.search(name).group(1))
        assert part["id"] == [ids[start[shard] + k] for k in part["row"]]

    # the certificate covers every answer, the filtered ones too
    cert = summary["certificate"]
    assert cert["rows"] == ROWS and cert["answered"] == ROWS - len(BAD)
    assert sum(p["rows"] for p in cert["parts"]) == ROWS and cert["audit"] > 0

    # verify reads the filtered parts: the kept rows' texts, found by `row`, through the original model
    local.set_policy(ExitPolicy(np.ones(local.num_ramps), local.policy.active, 0))
    truth = dict(zip(good, local.predict([texts[i] for i in good]).predictions))
    answered = [r for r in rows if r["error"] is None]
    report = verify(str(tmp_path / "out"), echo=lambda *_: None)
    assert report["rows_output"] == len(rows) and report["rows_checked"] == len(answered)
    assert report["filtered_out"] == ROWS - len(kept)
    wrong = sum(r["label_id"] != truth[int(r["id"][1:])].label_id for r in answered)
    assert report["disagreements"] == wrong
    if str(L) in report["per_exit_layer"]:
        assert report["per_exit_layer"][str(L)]["agreement"] == 1.0

    # --resume: half the parts lost; the others (fewer rows than their shard: the filter) count as finished
    before = _parts(tmp_path / "out")
    lost = list(before)[1::2]
    for name in lost:
        os.remove(tmp_path / "out" / name)
    again = run_job(cfg.model_copy(update={"resume": True}), echo=lambda *_: None)
    after = _parts(tmp_path / "out")
    assert again["shards_resumed"] == len(before) - len(lost)
    redone = {int(sink.PART.search(p).group(1)) for p in lost}
    assert again["rows"] == sum(s["stop"] - s["start"] for s in plan if s["shard"] in redone)
    assert {p: t for p, t in after.items() if p not in lost} == {p: t for p, t in before.items() if p not in lost}
    assert set(after) == set(before)
    assert sorted(r["id"] for r in pq.read_table(str(tmp_path / "out")).to_pylist()) == sorted(kept)
    assert again["certificate"]["rows"] == ROWS and again["certificate"]["answered"] == ROWS - len(BAD)
