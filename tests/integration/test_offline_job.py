"""The offline job on a real local Ray: real parquet/jsonl files, the real actor pool, the controller."""
import json
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.engine.predictor import Predictor
from pipeline.offline.job import JobError, run_job

SENTENCES = ["a great film", "dull and long", "the acting is superb", "I walked out", "not bad at all",
             "a masterpiece of boredom", "fun for the whole family", "the plot makes no sense"]


def _texts(n):
    return [f"{SENTENCES[i % len(SENTENCES)]} ({i})" for i in range(n)]


def _write_parquet_dir(path, n, files=3):
    path.mkdir(parents=True, exist_ok=True)
    texts = _texts(n)
    per = -(-n // files)
    for f in range(files):
        chunk = texts[f * per : (f + 1) * per]
        ids = [f"r{f * per + i}" for i in range(len(chunk))]
        pq.write_table(pa.table({"rid": ids, "text": chunk, "gold": [i % 2 for i in range(len(chunk))]}),
                       path / f"part-{f}.parquet")
    return texts


def _cfg(model, inp, out, **kw):
    base = {
        "model": model,
        "input": {"url": str(inp), "text_column": "text", "id_column": "rid", "passthrough": ["gold"],
                  "rows_per_shard": 64},
        "output": {"url": str(out)},
        "actors": {"min_actors": 2, "max_actors": 2, "num_cpus": 0.5, "tokenize_cpus": 0.25,
                   "wait_for_actors_s": 180},
        "controller": {"enabled": True, "name": f"ctl-{os.path.basename(str(out))}",
                       "tuning": {"window_rows": 32}},
        # float32: `dtype: auto` runs bfloat16 beside a float32 reference where the CPU is fast at it (tested apart)
        "engine": {"shadow_fraction": 0.25, "dtype": "float32"},
        # Calibration changes the thresholds: tests of the other machinery run without it (its own tests below).
        "certify": {"enabled": False},
    }
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return JobConfig.model_validate(base)


def _read_output(out):
    return pq.read_table(str(out)).to_pylist()


def _shard_rows(out) -> dict:
    """id -> (shard, position in the shard) of every output row, from the part names."""
    found = {}
    for name in sorted(os.listdir(out)):
        if name.startswith("part-"):
            shard, first = (int(x) for x in name[len("part-"):-len(".parquet")].split("-"))
            for k, rid in enumerate(pq.read_table(os.path.join(out, name), columns=["id"]).column("id").to_pylist()):
                found[rid] = (shard, first + k)
    return found


def test_job_classifies_every_row_once_and_spreads_over_actors(ray_session, tiny_artifact, tmp_path):
    _write_parquet_dir(tmp_path / "in", 600)
    # The tiny model classifies a 64-row shard in milliseconds: when tokenized shards arrive one at a time
    # (tokenize tasks start fast now), one idle actor can take them all. One-row micro-batches keep the
    # actors busy, as a real model does, so shards queue and the least-busy pick spreads them.
    summary = run_job(_cfg(tiny_artifact, tmp_path / "in", tmp_path / "out", engine={"max_batch_rows": 1}))
    rows = _read_output(tmp_path / "out")
    assert sorted(r["rid"] if "rid" in r else r["id"] for r in rows) == sorted(f"r{i}" for i in range(600))
    assert len({r["id"] for r in rows}) == 600
    others = sorted(p for p in os.listdir(tmp_path / "out") if not p.startswith("part-"))
    assert others == ["_offramp_attempts", "_offramp_plan.json", "_offramp_summary.json"]
    assert summary["rows"] == 600 and summary["errors"] == 0 and summary["shards_retried"] == 0
    assert len(summary["rows_per_worker"]) >= 2, f"work did not spread: {summary['rows_per_worker']}"
    assert summary["compression_per_worker"] == {w: "none" for w in summary["rows_per_worker"]}
    assert sum(summary["exits_per_layer"].values()) == 600
    assert summary["shadow_rows"] > 50 and 0 <= summary["shadow_agreement"] <= 1
    assert "controller" in summary and summary["controller"]["version"] >= 0
    assert set(summary["token_budget"]) == {"min", "median", "max"}
    assert {r["gold"] for r in rows} == {0, 1}  # pass-through column kept
    # (the answers-equal-local check runs without a controller, in the resume test: this controller
    # warm-starts and re-tunes, so the thresholds move during the job)


def test_bad_rows_are_reported_with_errors_not_dropped(ray_session, tiny_artifact, tmp_path):
    lines = [{"text": "fine"}, {"text": None}, {"text": ""}, {"text": "   "}, {"text": "word " * 800}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = _cfg(tiny_artifact, tmp_path / "in.jsonl", tmp_path / "out",
               input={"id_column": None, "passthrough": [], "rows_per_shard": 2, "url": str(tmp_path / "in.jsonl")},
               controller={"enabled": False})
    summary = run_job(cfg)
    rows = sorted(_read_output(tmp_path / "out"), key=lambda r: int(r["id"].split(":")[1]))
    assert [r["id"] for r in rows] == [f"in.jsonl:{i}" for i in range(5)]
    assert rows[0]["error"] is None and rows[0]["label"]
    assert "null" in rows[1]["error"] and "empty" in rows[2]["error"] and "empty" in rows[3]["error"]
    assert rows[4]["truncated"] and rows[4]["error"] is None
    assert summary["errors"] == 3 and summary["truncated"] == 1


def test_missing_column_fails_before_model_work(ray_session, tiny_artifact, tmp_path):
    _write_parquet_dir(tmp_path / "in", 10, files=1)
    cfg = _cfg(tiny_artifact, tmp_path / "in", tmp_path / "out", input={"text_column": "body"})
    with pytest.raises(JobError, match="no column 'body'"):
        run_job(cfg)
    assert not (tmp_path / "out").exists()


def test_unreadable_input_and_missing_model_are_clear(ray_session, tiny_artifact, tmp_path):
    with pytest.raises(JobError, match="cannot read input"):
        run_job(_cfg(tiny_artifact, tmp_path / "nothing-here", tmp_path / "out"))
    with pytest.raises(JobError, match="offramp bootstrap"):
        run_job(_cfg(str(tmp_path / "no-model"), tmp_path / "in", tmp_path / "out"))


def test_resume_finishes_only_missing_shards_without_duplicates(ray_session, tiny_artifact, tmp_path):
    texts = _write_parquet_dir(tmp_path / "in", 300)
    cfg = _cfg(tiny_artifact, tmp_path / "in", tmp_path / "out", controller={"enabled": False})
    first = run_job(cfg)
    # No controller: the artifact's thresholds throughout, so the answers equal the local predictor's.
    local = Predictor(tiny_artifact).predict(texts, ids=[f"r{i}" for i in range(300)])
    by_id = {r["id"]: r for r in _read_output(tmp_path / "out")}
    assert [by_id[f"r{i}"]["label"] for i in range(300)] == [p.label for p in local.predictions]
    assert [by_id[f"r{i}"]["exit_layer"] for i in range(300)] == [p.exit_layer for p in local.predictions]
    parts = sorted(p for p in os.listdir(tmp_path / "out") if p.startswith("part-"))
    assert parts == [f"part-{i:06d}-000000.parquet" for i in range(first["shards"])]  # deterministic names
    for p in parts[1::2]:  # an interrupted job: half the parts missing, a stray temp file
        os.remove(tmp_path / "out" / p)
    # ...and a shard only partly written (a piece of it): it must be redone whole, not duplicated
    piece = pq.read_table(tmp_path / "out" / parts[0]).slice(0, 5)
    pq.write_table(piece, tmp_path / "out" / parts[1])
    (tmp_path / "out" / "_tmp-000001-000000-dead.parquet").write_bytes(b"partial")
    with pytest.raises(JobError, match="--resume"):
        run_job(cfg)
    second = run_job(cfg.model_copy(update={"resume": True}))
    assert second["shards_resumed"] == len(parts) - len(parts[1::2])
    plan = json.loads((tmp_path / "out" / "_offramp_plan.json").read_text())["shards"]
    redone = {int(p.split("-")[1]) for p in parts[1::2]}
    assert second["rows"] == sum(s["stop"] - s["start"] for s in plan if s["shard"] in redone)
    assert second["rows"] < 300
    rows = _read_output(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(300))
    assert not any(p.startswith("_tmp-") for p in os.listdir(tmp_path / "out"))


def _actor_pids(name="EarlyExitWorker"):
    """PIDs of this Ray session's live worker actors, from its GCS actor table (never by process name machine-wide:
    that could hit another user's Ray). The public ray.util.state needs the dashboard, which the tests leave off."""
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if a["State"] == "ALIVE" and name in a["ActorClassName"] and a["Pid"]]


def test_killed_actor_job_still_completes_exactly_once(ray_session, tiny_artifact, tmp_path):
    _write_parquet_dir(tmp_path / "in", 3000, files=2)
    cfg = _cfg(tiny_artifact, tmp_path / "in", tmp_path / "out", input={"rows_per_shard": 100},
               controller={"enabled": False})
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("summary", run_job(cfg)))
    t.start()
    killed = None
    deadline = time.time() + 120
    while time.time() < deadline and t.is_alive():
        done = [p for p in os.listdir(tmp_path / "out")] if (tmp_path / "out").exists() else []
        pids = _actor_pids()
        if sum(p.startswith("part-") for p in done) >= 2 and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    t.join(timeout=300)
    assert killed is not None, "the job finished before an actor could be killed; make it longer"
    assert not t.is_alive() and "summary" in result
    rows = _read_output(tmp_path / "out")
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 3000


def test_certified_job_calibrates_on_its_own_rows_audits_the_rest_and_certifies(ray_session, tiny_artifact, tmp_path):
    """The default job: a uniform sample run first by the actors and answered by the original head (kept as final
    answers), shards reached before the calibration decision answered by the original in full, the rest at the
    certified thresholds, a certificate whose counts add up, and --resume reusing the calibration."""
    import numpy as np

    from pipeline.engine.policy import ExitPolicy
    from pipeline.offline import sink

    texts = _write_parquet_dir(tmp_path / "in", 900)
    cfg = _cfg(tiny_artifact, tmp_path / "in", tmp_path / "out", controller={"enabled": False},
               certify={"enabled": True, "calibration_rows": 200, "max_calibration_share": 0.5,
                        "audit_fraction": 0.3})
    messages = []
    summary = run_job(cfg, echo=messages.append)
    cert = summary["certificate"]
    cal = pq.read_table(tmp_path / "out" / "_offramp_calibration.parquet").to_pydict()
    assert len(cal["id"]) == 200 and len(set(cal["id"])) == 200
    rows = {r["id"]: r for r in _read_output(tmp_path / "out")}
    assert len(rows) == 900
    local = Predictor(tiny_artifact)
    L = local.model.num_layers
    local.set_policy(ExitPolicy(np.ones(local.num_ramps), local.policy.active, 0))  # the original head alone
    full = local.predict(texts, ids=[f"r{i}" for i in range(900)])
    certified = cert["calibration_report"]["thresholds"]
    local.set_policy(ExitPolicy(np.asarray(certified), local.policy.active, 0))
    at_certified = local.predict(texts, ids=[f"r{i}" for i in range(900)])
    stats = sink.part_stats(str(tmp_path / "out"), set(range(summary["shards"])))
    # a part's first rows may have been answered in full before the decision (a chunk at a time, in order)
    before = {(p["shard"], p["first_row"] + k) for p in stats for k in range(p["before_decision"])}
    assert len(before) < 900 and cert["cost"]["rows_answered_in_full_before_the_decision"] == len(before)
    shard_row = _shard_rows(tmp_path / "out")
    sampled = set(cal["id"])
    for i in range(900):
        r = rows[f"r{i}"]
        if f"r{i}" in sampled or shard_row[f"r{i}"] in before:  # answered by the original head
            assert r["exit_layer"] == L and r["label_id"] == full.predictions[i].label_id
        else:
            assert (r["label_id"], r["exit_layer"]) == (at_certified.predictions[i].label_id,
                                                        at_certified.predictions[i].exit_layer)
    assert cert["answered"] == 900 and cert["exact"] + cert["early"] == 900 and cert["calibration"] <= cert["exact"]
    assert cert["calibration"] == sum(shard_row[i] not in before for i in sampled)
    assert cert["early"] == sum(r["exit_layer"] < L for r in rows.values())
    after = 900 - len(before) - cert["calibration"]  # the bulk rows run at the certified thresholds
    assert 0.2 < cert["audit"] / after < 0.4  # a 30% Bernoulli sample of them
    assert sum(p["rows"] for p in cert["parts"]) == 900
    lo, hi = cert["interval"]
    assert lo <= (cert["agreement"] if cert["agreement"] is not None else hi) <= hi
    assert any("calibrating on 200 rows" in m for m in messages)
    cost = cert["cost"]  # what the promise cost, as shares of the actors' time
    assert 0 < cost["calibration_share_of_actor_time"] < 1 and cost["calibration_decided_after_seconds"] > 0
    assert cost["reference_share_of_actor_time"] == 0  # a float32 artifact is the original: no second model
    # Layers run past an answer: only audited rows that exited early (no controller, so no other feedback rows)
    assert (cost["feedback_share_of_bulk_layer_work"] > 0) == (cert["audit_early"] > 0)
    assert 0 <= cost["feedback_share_of_actor_time_estimated"] <= cost["feedback_share_of_bulk_layer_work"] < 1

    # --resume: half the parts lost; the calibration sample is reused, and the certificate still counts every part
    parts = sorted(p for p in os.listdir(tmp_path / "out") if p.startswith("part-"))
    for p in parts[::2]:
        os.remove(tmp_path / "out" / p)
    messages.clear()
    again = run_job(cfg.model_copy(update={"resume": True}), echo=messages.append)
    assert any("reloaded" in m for m in messages) and not any("calibrating on" in m for m in messages)
    assert again["certificate"]["rows"] == 900 and again["certificate"]["answered"] == 900
    assert len({r["id"] for r in _read_output(tmp_path / "out")}) == 900


def test_repair_reruns_named_parts_through_the_original_model_and_recertifies(ray_session, tiny_artifact, tmp_path):
    """An output whose certificate falls short is brought within the promise: the named parts' early-exit rows
    get the original head's answers, and the certificate rests on a fresh sample of the rest."""
    import numpy as np

    from pipeline.engine.policy import ExitPolicy
    from pipeline.offline.job import repair_job

    texts = _write_parquet_dir(tmp_path / "in", 600)
    # Thresholds opened by hand and no calibration (only the audit and the certificate), an audit far too
    # small to certify the many early exits, and no automatic top-up: --repair has work to do.
    cfg = _cfg(tiny_artifact, tmp_path / "in", tmp_path / "out", controller={"enabled": False},
               engine={"thresholds": [0.0, 1.0, 1.0]},
               certify={"enabled": True, "calibrate": False, "audit_fraction": 0.02, "top_up": False})
    cert = run_job(cfg)["certificate"]
    assert cert["early"] == 600 and not cert["certified"] and "calibration_report" not in cert
    parts = sorted({p["shard"] for p in cert["parts"]})[:3]
    messages = []
    repaired = repair_job(cfg, parts, echo=messages.append)["certificate"]
    assert any("re-running" in m for m in messages)
    local = Predictor(tiny_artifact)
    local.set_policy(ExitPolicy(np.ones(local.num_ramps), local.policy.active, 0))
    full = local.predict(texts, ids=[f"r{i}" for i in range(600)])
    plan = json.loads((tmp_path / "out" / "_offramp_plan.json").read_text())["shards"]
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 600
    first = {}  # input file -> its first row's global index
    for name in sorted({s["path"] for s in plan}):
        first[name] = len(first) * 200
    shard_of = {}
    for s in plan:
        for k in range(s["start"], s["stop"]):
            shard_of[f"r{first[s['path']] + k}"] = s["shard"]
    for r in rows:
        i = int(r["rid"][1:]) if "rid" in r else int(r["id"][1:])
        if shard_of[r["id"]] in parts:  # every row of a repaired part carries the original head's answer
            assert r["exit_layer"] == local.model.num_layers and r["label_id"] == full.predictions[i].label_id
    assert repaired["repaired"] and repaired["early"] == cert["early"] - sum(
        s["stop"] - s["start"] for s in plan if s["shard"] in parts)
    # A random tiny model's ramp disagrees far beyond the budget: no fresh sample can certify the rest, so
    # the certificate stays short and says so; repairing every part leaves an exact output.
    assert not repaired["certified"] and repaired["earlier_looks"][-1]["certified"] is False
    final = repair_job(cfg, "all", echo=messages.append)["certificate"]
    assert final["certified"] and final["early"] == 0 and final["interval"] == [1.0, 1.0]
    by_id = {r["id"]: r for r in pq.read_table(str(tmp_path / "out")).to_pylist()}
    assert [by_id[f"r{i}"]["label_id"] for i in range(600)] == [p.label_id for p in full.predictions]
    summary = json.loads((tmp_path / "out" / "_offramp_summary.json").read_text())
    assert summary["certificate"]["repaired"] and len(summary["certificate"]["earlier_looks"]) == 2


def test_jobs_in_a_row_each_get_their_own_controller_with_their_settings(ray_session, tiny_artifact, tmp_path):
    """On one long-lived cluster, two jobs on the same model: the second one's tuning takes effect (no reuse of
    the first job's controller), and neither leaves its controller behind; `offramp controllers` lists none."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.control.actor import list_controllers

    _write_parquet_dir(tmp_path / "in", 200, files=2)
    summaries = []
    for k, window in enumerate((32, 48)):
        cfg = _cfg(tiny_artifact, tmp_path / "in", tmp_path / f"out{k}",
                   controller={"name": None, "tuning": {"window_rows": window}})
        summaries.append(run_job(cfg))
        assert [c["name"] for c in list_controllers()] == []  # removed with its job
    first, second = (s["controller"] for s in summaries)
    assert first["name"] != second["name"] and first["name"].startswith("offramp-job-")
    assert (first["settings"]["window_rows"], second["settings"]["window_rows"]) == (32, 48)
    assert not first["shared"] and not second["shared"]
    out = CliRunner().invoke(main, ["controllers"])
    assert out.exit_code == 0 and "no controllers in namespace 'offramp'" in out.output
