"""offramp: early-exit batch inference for transformer text classifiers on Ray.

Importing the package quiets three kinds of library noise in every process that runs offramp code (the CLI,
Ray workers, Serve replicas), so users see offramp's own output and the warnings that matter:
transformers' weight-loading progress bars, torch's deprecation notes about torchao's enums, and torchao's
notes about optional CUDA kernels it cannot load on a CPU box.
"""
import logging as _logging
import os as _os

_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers when it is imported
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
_logging.getLogger("torchao").setLevel(_logging.ERROR)
