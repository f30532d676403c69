"""What `offramp replay` streams: the artifact's bootstrap rows, the stream, the drifted rows, each recorded once
(every ramp's output) and cached in the output folder, keyed by the artifact and the exact texts."""
from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from pipeline.commands.progress import progress
from pipeline.model.artifact import fingerprint


def shuffled_texts(ds, seed: int, limit: int | None) -> list[str]:
    """Usable texts in a deterministic shuffled order (built-in files are sorted), at most ``limit``."""
    from pipeline.data.texts import validate_text

    order = np.random.default_rng(seed).permutation(len(ds))
    texts = [ds.texts[i] for i in order if validate_text(ds.texts[i]) is None]
    return texts[:limit] if limit else texts


def bootstrap_and_stream(data: str, text_column: str, seed: int, limit: int | None,
                         manifest) -> tuple[list[str], list[str], str]:
    """(bootstrap texts, stream texts, description). The bootstrap rows are the artifact's own validation
    rows, rebuilt with `offramp bootstrap`'s split (its seed and share from the manifest when `data` is the
    data it was bootstrapped on). Built-ins stream their test split; files/URLs the rest of the rows."""
    from pipeline.config import BootstrapConfig
    from pipeline.data.datasets import BUILTIN, load_dataset
    from pipeline.data.splits import split_data

    same = manifest.bootstrap.get("data") == data
    split = {k: manifest.bootstrap[k] for k in ("seed", "validation_fraction") if same and k in manifest.bootstrap}
    cfg = BootstrapConfig(data=data, text_column=text_column, **split)
    fit, val = split_data(data, cfg)
    if data in BUILTIN:
        test = load_dataset(data).split("test", cfg.seed)
        return shuffled_texts(val, seed, limit), shuffled_texts(test, seed, limit), f"{data} test split"
    return (shuffled_texts(val, seed, limit), shuffled_texts(fit, seed, limit),
            f"{data} (the rows after the bootstrap's)")


class Recordings:
    """Records texts through one lazily loaded Predictor (release mode, every ramp closed), or reuses a cached
    recording of exactly these texts with exactly this artifact. `seconds` sums the recording time per label."""

    def __init__(self, model_dir: str, device: str, cache_dir: Path, reuse: bool):
        self.model_dir, self.device, self.cache_dir, self.reuse = model_dir, device, cache_dir, reuse
        self.fp = fingerprint(model_dir)
        self.seconds: dict[str, float] = {}
        self._predictor = None

    def _get_predictor(self):
        if self._predictor is None:
            from pipeline.config import EngineConfig
            from pipeline.engine.predictor import Predictor

            # A compressed artifact's own numerics, even where its kernels are slow.
            self._predictor = Predictor(self.model_dir, EngineConfig(mode="release", device=self.device,
                                                                     slow_compression="apply"))
        return self._predictor

    def __call__(self, texts: list[str], label: str):
        """(FeedbackWindow of every ramp, the original model's confidence per row [N])."""
        from pipeline.engine.ramp_outputs import record_ramps, recording_path
        from pipeline.feedback import FeedbackWindow

        path = recording_path(self.cache_dir, label, self.fp, texts)
        if self.reuse and path.exists():
            z = np.load(path)
            if "score" in z.files:
                click.echo(f"{label}: reusing {path} ({len(z['final'])} rows)", err=True)
                self.seconds.setdefault(label, 0.0)
                return FeedbackWindow(z["conf"], z["pred"], z["final"]), z["score"]
        t = time.perf_counter()
        w, score = record_ramps(self._get_predictor(), texts, progress=progress(f"recording {label}"),
                                return_confidence=True)
        self.seconds[label] = time.perf_counter() - t
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, conf=w.conf, pred=w.pred, final=w.final, score=score)
        return w, score
