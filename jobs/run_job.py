"""Ray Jobs entrypoint for offline jobs.

    python jobs/run_job.py CONFIG.yaml [offramp run options]   # a YAML inside the working dir
    python jobs/run_job.py --config-b64 BASE64_JSON            # what `offramp submit` sends

`offramp submit` validates the YAML on the submitting machine and sends the resulting JobConfig
inline, so a config kept outside the project still runs exactly as it was checked.
"""
import base64
import sys

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--config-b64":
        from pipeline.config import JobConfig
        from pipeline.offline.job import format_summary, run_job

        cfg = JobConfig.model_validate_json(base64.b64decode(sys.argv[2]))
        print(format_summary(run_job(cfg, address="auto")))
    else:
        from pipeline.cli import main

        sys.exit(main(["run", *sys.argv[1:], "--address", "auto"]))
