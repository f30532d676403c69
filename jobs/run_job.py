"""Ray Jobs entrypoint: `python jobs/run_job.py CONFIG [--input URL] [--output URL] [--resume]`.

`offramp submit` uses this; it runs on the cluster's head as a Ray driver (ray.init(address="auto")).
"""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:], "--address", "auto"]))
