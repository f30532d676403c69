"""CLI error paths, in-process (click's CliRunner): a non-zero exit and a message naming the bad value and
the fix. No subprocess is needed: none of these gets as far as starting Ray or loading a model."""
import pytest
from click.testing import CliRunner

from pipeline.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args,needle", [
    (("quantize", "--model", "no/such/dir", "--method", "int8-dynamic", "--out", "x"), "is not a directory"),
    (("distill", "--teacher", "t", "--keep-layers", "0,2", "--num-layers", "2", "--out", "x"), "exactly one of"),
    (("distill", "--teacher", "t", "--keep-layers", "0,two", "--out", "x"), "comma-separated"),
    (("finetune", "--dataset", "nope", "--out", "y"), "built-in"),
    (("bootstrap", "--model", "minilm-l6", "--out", "x"), "no classification head"),
    (("bench", "report", "--results", "no/such/dir"), "offramp bench"),
])
def test_errors_name_the_bad_value(args, needle):
    out = _run(*args)
    assert out.exit_code != 0 and needle in out.output, out.output


def test_commands_on_a_folder_that_is_not_an_artifact_say_how_to_make_one(tmp_path):
    for args in (("predict", "--model", tmp_path, "hi"), ("replay", "--model", tmp_path)):
        out = _run(*args)
        assert out.exit_code != 0 and "offramp bootstrap" in out.output, out.output


def test_replay_names_the_settings_it_knows(tiny_artifact, tmp_path):
    out = _run("replay", "--model", tiny_artifact, "--set", "nope=1", "--out", tmp_path / "o")
    assert out.exit_code == 2 and "tune_windows" in out.output


def test_serve_warns_when_serve_would_queue_requests_before_the_replica_can_refuse_them(capsys):
    from pipeline.commands.serve import _check_ongoing
    from pipeline.serving.config import ServeAppConfig

    cfg = ServeAppConfig(model="x", batching={"max_queue": 256})
    _check_ongoing({"name": "a", "deployments": [{"name": "EarlyExitDeployment", "max_ongoing_requests": 64}]}, cfg)
    assert "max_ongoing_requests=64 < batching.max_queue=256" in capsys.readouterr().err
    _check_ongoing({"name": "a"}, cfg)  # the deployment's default (512) lets them through
    assert capsys.readouterr().err == ""


def test_a_serve_apps_own_controller_never_takes_the_shared_per_model_name():
    from pipeline.control.deployment import controller_name
    from pipeline.serving.app import resolve_config

    shared = resolve_config({"model": "m", "controller": {"share": True}}).controller.name
    assert shared == controller_name("m")
    assert resolve_config({"model": "m"}, "movies").controller.name == "offramp-serve-movies"
    assert resolve_config({"model": "m"}).controller.name not in (shared, "offramp-serve-movies")


def test_a_second_budget_for_the_controller_fails_before_any_model_work(tiny_artifact, tmp_path):
    """certify.constraint is the job's promise; controller.tuning.constraint set to another value is refused
    (naming both fields) before Ray starts (the unit fixture fails any ray.init)."""
    import pytest

    from pipeline.config import JobConfig
    from pipeline.offline.job import JobError, run_job

    (tmp_path / "in.jsonl").write_text('{"text": "a fine film"}\n{"text": "dull"}\n')
    cfg = JobConfig.model_validate({"model": tiny_artifact, "input": {"url": str(tmp_path / "in.jsonl")},
                                    "output": {"url": str(tmp_path / "out")},
                                    "certify": {"constraint": 0.001},
                                    "controller": {"tuning": {"constraint": 0.01}}})
    with pytest.raises(JobError, match=r"controller.tuning.constraint=0.01 differs from the job's promise, "
                                       r"certify.constraint \(0.001\)"):
        run_job(cfg, echo=lambda m: None)
    same = cfg.model_copy(update={"certify": cfg.certify.model_copy(update={"constraint": None})})
    with pytest.raises(JobError, match="the artifact.s constraint"):  # no certify.constraint: the artifact.s 0.01
        run_job(same.model_copy(update={"controller": same.controller.model_copy(
            update={"tuning": same.controller.tuning.model_copy(update={"constraint": 0.02})})}), echo=lambda m: None)
