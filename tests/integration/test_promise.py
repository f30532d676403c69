"""One promise per job, always against the float original: a job's own `certify.constraint`, and a half-precision
model's answers (its own head's included) audited against its float32 original."""
import pyarrow.parquet as pq

from pipeline.offline.job import run_job
from pipeline.offline.verify import verify
from tests.claims import holds
from tests.integration.test_offline_job import _cfg, _read_output, _write_parquet_dir


def _certified(tiny_artifact, tmp_path, name, **kw):
    return _cfg(tiny_artifact, tmp_path / "in", tmp_path / name, controller={"enabled": False},
                certify={"enabled": True, "calibration_rows": 300, "max_calibration_share": 0.4,
                         "on_uncertified": "warn", **kw.pop("certify", {})}, **kw)


def test_a_job_sets_its_own_promise(ray_session, tiny_artifact, tmp_path):
    """Two jobs on one artifact at 1% and 0.1%: each calibrates, audits and certifies against its own promise; the
    stricter one never holds a ramp more open."""
    _write_parquet_dir(tmp_path / "in", 900)
    loose = run_job(_certified(tiny_artifact, tmp_path, "loose", certify={"constraint": 0.01}))["certificate"]
    strict = run_job(_certified(tiny_artifact, tmp_path, "strict", certify={"constraint": 0.001}))["certificate"]
    assert (loose["promise"], strict["promise"]) == (0.99, 0.999)
    assert loose["calibration_report"]["promise_constraint"] == 0.01
    assert strict["calibration_report"]["promise_constraint"] == 0.001
    assert strict["calibration_report"]["constraint"] < loose["calibration_report"]["constraint"]
    assert all(s >= lo for s, lo in zip(strict["calibration_report"]["thresholds"],
                                        loose["calibration_report"]["thresholds"]))


def test_a_bfloat16_job_is_certified_against_its_float32_original(ray_session, tiny_artifact, tmp_path):
    """The running model in bfloat16: the float32 original answers its calibration rows and runs beside it on
    audit and feedback rows, so rows its own head answered are audited like early exits, and `verify` (plain float32
    transformers) finds the truth inside the certificate's interval."""
    _write_parquet_dir(tmp_path / "in", 900)
    summary = run_job(_certified(tiny_artifact, tmp_path, "out", engine={"dtype": "bfloat16"},
                                 certify={"audit_fraction": 0.3}))
    cert = summary["certificate"]
    cost = cert["cost"]
    assert cost["reference_share_of_actor_time"] > 0  # the float32 original ran beside it
    candidates = {c["candidate"]: c for c in cert["calibration_report"]["candidates"]}
    assert set(candidates) == {"model", "original", "own head"} and candidates["original"]["head_disagreement"] == 0
    # audited against its own head: the head's bound leaves the exits less of the budget, and no second model runs
    # in the bulk; against the original: it does
    assert candidates["own head"]["budget"] < candidates["model"]["budget"]
    head = cert["calibration_report"]["head"]
    assert 0 < head["rows"] <= cert["calibration"]
    if cert.get("audit_against") == "own head":
        assert cert["head"] == head
        assert cost["bulk_reference_share_of_actor_time"] == 0
    elif cert["answer_with"] == "model":
        assert cost["bulk_reference_share_of_actor_time"] > 0
    L = summary["layers"]
    rows = _read_output(tmp_path / "out")
    if cert["answer_with"] == "model":  # bfloat16 answered the bulk: only the original's own answers are exact
        before = sum(p["before_decision"] for p in _stats(tmp_path / "out"))
        assert cert["exact"] == cert["calibration"] + before
        assert cert["early"] == sum(r["error"] is None for r in rows) - cert["exact"]
        assert all("bfloat16" in p for p in summary["precision_per_worker"].values())
    else:  # the float original answered: its head's rows are exact
        assert cert["early"] == sum(r["exit_layer"] < L for r in rows)
    report = verify(str(tmp_path / "out"), echo=lambda m: None)
    assert holds(cert, report["agreement"]), (report["agreement"], cert["interval"])


def _stats(out):
    import json

    from pipeline.offline import sink

    found = []
    for paths in sink.list_parts(str(out)).values():
        for p in paths:
            found.append(json.loads(pq.ParquetFile(p).schema_arrow.metadata[sink.STATS_KEY]))
    return found
