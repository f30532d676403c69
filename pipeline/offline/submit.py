"""Ray Jobs: submit the same job YAML to a cluster, follow its status and logs."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Never upload the local venv, git history, outputs or cached data; models travel by path or URL.
EXCLUDES = [".venv", ".git", "artifacts", "bench_results", "**/__pycache__", ".pytest_cache"]


def _absolute(value: str | None) -> str | None:
    """Local paths become absolute (the job's working dir is a copy); URLs stay as they are."""
    if value is None or "://" in value or value.startswith("builtin:"):
        return value
    return os.path.abspath(value)


def submit_job(config: str, address: str, input_url: str | None = None, output_url: str | None = None,
               resume: bool = False, model: str | None = None) -> str:
    import base64

    from ray.job_submission import JobSubmissionClient

    from pipeline.config import JobConfig
    from pipeline.data.storage import ray_env_vars

    cfg = JobConfig.from_yaml(config, **{"input.url": input_url, "output.url": output_url, "model": model})
    cfg = cfg.model_copy(update={
        "model": _absolute(cfg.model),
        "resume": resume or cfg.resume,
        "input": cfg.input.model_copy(update={"url": _absolute(cfg.input.url)}),
        "output": cfg.output.model_copy(update={"url": _absolute(cfg.output.url)}),
    })
    payload = base64.b64encode(cfg.model_dump_json().encode()).decode()
    args = ["python", "jobs/run_job.py", "--config-b64", payload]
    import time

    client = JobSubmissionClient(address)
    for attempt in range(30):
        try:
            return client.submit_job(
                entrypoint=" ".join(args),
                runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES,
                             "env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                                          "RAY_USAGE_STATS_ENABLED": "0",
                                          # the job's storage settings, and where this machine's S3 is
                                          **ray_env_vars(cfg.storage)}},
                metadata={"offramp_config": os.path.basename(config)},
            )
        except RuntimeError as e:
            # a freshly started head answers this until its job agent is up
            if "No available agent" not in str(e) or attempt == 29:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def job_status(job_id: str, address: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(job_id))


def job_logs(job_id: str, address: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address).get_job_logs(job_id)


def wait_for_job(job_id: str, address: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(status)
        time.sleep(poll_s)
    return "TIMEOUT"
