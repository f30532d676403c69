"""Typed, validated configuration. YAML files under configs/ only fill these in.

Every field carries a docstring; every check names the bad value and the fix.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.data.storage_config import GCSSettings, S3Settings, StorageConfig  # noqa: F401 (part of the config API)

Mode = Literal["exit", "release"]
COMPRESSION_METHODS = ("int8-dynamic", "fp16", "bf16")
"""The compression registry's methods (pipeline.compression.methods(); a test keeps the two equal), named here
so that config, the lowest layer, checks them without importing the registry."""
DType = Literal["auto", "float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in YAML must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Strict):
    """How one worker runs the early-exit model on a batch of texts."""

    mode: Mode = "exit"
    """`exit`: exited rows leave the batch so later layers run on fewer rows (saves compute).
    `release`: answers as exit mode, released at their ramp (saves latency), and every row still runs to
    the end to feed the controller: rows answered at a ramp finish after the rest of the batch (online: when
    the replica is idle, so no waiting text pays for it)."""
    shadow_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """The share of rows that always run to the end with their batch to feed the controller (`exit` mode's
    only feedback; in `release` mode the other rows follow after the batch)."""
    token_budget: int = Field(8192, ge=16)
    """Initial micro-batch size in padded tokens (rows x longest row)."""
    max_batch_rows: int = Field(256, ge=1)
    """Upper bound on rows per micro-batch whatever the token budget."""
    latency_target_s: float = Field(0.25, gt=0)
    """Adaptive batching grows the token budget while micro-batches finish under this."""
    max_token_budget: int = Field(65536, ge=16)
    """The adaptive token budget never grows past this."""
    shape_multiple: int | None = Field(None, ge=1)
    """Micro-batches keep their row count and padded width at multiples of this, also as rows exit (exited rows
    ride along, unused): bfloat16 matmuls (oneDNN) and compiled layers pay for every new shape, and exits make
    many. 1: exact shapes. Default: 8 in half precision, compiled layers or CUDA; 1 in float32 eager on a CPU,
    where ride-along rows cost more than new shapes (measured on MiniLM-L6, exit mode, 2 threads: float32 1.12x
    the rows/s of 8 in 1,024-row shards and 1.19x in 32-row batches; bfloat16 0.65-0.67x)."""
    max_length: int | None = Field(None, ge=8)
    """Truncate inputs to this many tokens (default: the model's own maximum). Truncated rows are flagged."""
    device: str = "auto"
    """`auto` (CUDA when torch sees it, else CPU), `cpu`, `cuda` or `cuda:N`."""
    dtype: DType = "auto"
    """Compute dtype. `auto`: on CUDA the family's half precision (float16; bfloat16 for decoder classifiers); on a
    CPU with fast bfloat16 (AMX or AVX512-BF16) bfloat16 in a certified job, whose calibration measures its loss
    against the float32 original on the job's own rows, counts it in the promise and picks float32 instead where
    that is better; float32 elsewhere on CPU."""
    num_threads: int | None = Field(None, ge=1)
    """torch intra-op threads for CPU inference (default: torch's choice)."""
    thresholds: list[float] | None = None
    """Override the artifact's per-ramp thresholds (>= 1.0 closes a ramp). Default: the manifest's."""
    compression: str | None = Field(None, validation_alias=AliasChoices("compression", "quantize"))
    """A compression method applied at load time, e.g. `int8-dynamic` (CPU), `fp16` / `bf16` (GPU); see
    `pipeline.compression.methods()`. Unchecked: `offramp quantize` checks a method and records it in the artifact.
    (`quantize:`, its old name, is still read.)"""
    slow_compression: Literal["skip", "apply"] = "skip"
    """A compression (the artifact's or `compression`) with no fast kernels on this device is skipped: the float
    weights run, a warning is logged and the job summary's `compression_per_worker` says why. Today:
    int8-dynamic (torchao) on a CPU without AVX512-VNNI, where torch's int8 matmul is a reference loop ~17x
    slower than float32. `apply`: compress anyway (its numerics, at that speed). A method with no kernels at
    all here (int8-dynamic backend onednn on GPU or a non-x86 CPU) is skipped either way."""

    @field_validator("compression")
    @classmethod
    def _compression(cls, v: str | None) -> str | None:
        if v is not None and v not in COMPRESSION_METHODS:
            raise ValueError(f"compression={v!r} is not a compression method; use one of {list(COMPRESSION_METHODS)} "
                             "or leave it unset")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"device={v!r} is not understood; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    @model_validator(mode="after")
    def _budgets(self) -> "EngineConfig":
        if self.token_budget > self.max_token_budget:
            raise ValueError(
                f"token_budget={self.token_budget} exceeds max_token_budget={self.max_token_budget}; "
                "raise max_token_budget or lower token_budget"
            )
        return self


class FinetuneConfig(_Strict):
    """Fine-tuning an original classifier (the demo needs a real one)."""

    base: str = "minilm-l6"
    """`minilm-l6` (the packaged all-MiniLM-L6-v2), a local HF model directory, or a hub id."""
    dataset: str = "movie-reviews"
    """A built-in dataset name (movie-reviews, trec, movie-reviews-score, movie-reviews-reactions, ...:
    pipeline.data.datasets) or a parquet/jsonl/csv path or fsspec URL."""
    text_column: str = "text"
    label_column: str = "label"
    problem_type: Literal["auto", "single_label_classification", "regression", "multi_label_classification"] = "auto"
    """The head to train (transformers' `problem_type`). single_label_classification: one class per row (softmax,
    cross-entropy). regression: one output trained on a numeric label column (mean squared error).
    multi_label_classification: one output per label (sigmoid, binary cross-entropy); the label column holds a list
    of label names per row, or one string of them separated by commas. `auto`: a built-in dataset's own type (a
    file: single-label)."""
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    max_length: int = Field(128, ge=8)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (tests and smoke runs)."""
    limit: int | None = Field(None, ge=1)
    """Use only N training rows (a random sample)."""
    seed: int = 0


class BootstrapConfig(_Strict):
    """Training ramps at every cut point by distillation from the original model."""

    data: str = "movie-reviews"
    """A built-in dataset name or a parquet/jsonl/csv path or fsspec URL (labels not needed)."""
    text_column: str = "text"
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    """Ramp pooling: masked mean over tokens (measured far better than [CLS] on early layers), the first token
    (`cls`), or the last real token (`last`, where a decoder classifier's score head reads). `auto`: the
    family's choice (mean for encoders, last for decoders)."""
    regression_bins: list[float] | None = None
    """A regression head's bins, as their values (e.g. [0, 1, 2, 3, 4, 5]: a score goes to the nearest, edges
    halfway); agreement means the same bin. Default: integers over the range of the head's scores on the
    bootstrap data, rounded (a score is rounded and clamped to that range)."""
    label_threshold: float = Field(0.5, gt=0, lt=1)
    """A multi-label head's cut: a label is in the answer when its sigmoid is at least this."""
    temperature: float = Field(2.0, gt=0)
    """Distillation temperature for the soft targets."""
    epochs: int = Field(30, ge=1)
    """Ramp training epochs over the cached pooled features (cheap: the encoder runs once)."""
    learning_rate: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    """Encoder batch size while caching features."""
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Held-out share for per-ramp agreement and initial thresholds (URL data; built-ins use their split)."""
    constraint: float = Field(0.01, ge=0, lt=1)
    """Accuracy constraint for the initial thresholds: at most this share of disagreement."""
    tune_headroom: float = Field(0.5, gt=0, le=1)
    """Share of the constraint the initial thresholds may spend on the validation split: thresholds
    tuned to the full budget on ~1k rows overfit them (measured: 98.4% agreement on the test split)."""
    limit: int | None = Field(None, ge=1)
    max_length: int = Field(128, ge=8)
    seed: int = 0


def default_window_rows(constraint: float) -> int:
    """Feedback rows per controller window: 512 at a 1% budget or more (5 disagreements of budget a window),
    scaled up as 1/constraint below it (a compressed artifact's smaller budget), at most 8192. A window's
    budget in rows is the guard's resolution: at 0.5%, 512 rows allow 2.6 disagreements, and one unlucky row
    reads as a violation."""
    if constraint <= 0.0 or constraint >= 0.01:
        return 512
    return min(8192, math.ceil(512 * 0.01 / constraint))


class TuningConfig(_Strict):
    """How the threshold controller tunes and guards (pipeline.control.controller); the defaults follow
    Apparate's artifact or the measurements in docs/controller.md. Set in the job / Serve YAML under
    `controller.tuning`; unset fields keep these defaults (`constraint`: the artifact's)."""

    constraint: float = Field(0.01, ge=0.0, lt=1.0)
    """Accuracy budget: largest allowed 1 - agreement with the original model, per window."""
    window_rows: int | None = Field(None, ge=1)
    """Feedback rows per window; the guard and the tuner run once per full window. None: 512 at a 1% budget
    or more, and as many more below it as keep the budget at ~5 disagreements a window
    (``default_window_rows``)."""
    tune_windows: int = Field(8, ge=1)
    """The tuner sees the last this many windows (Apparate: the last 4 batches; more rows overfit less)."""
    recent_windows: int = Field(2, ge=0)
    """The thresholds must also meet the tuning target on the newest this many windows alone: per ramp,
    the higher of the thresholds tuned on all ``tune_windows`` and on these (0 = off). A buffer that
    straddles a change of inputs otherwise averages the new rows' disagreement away."""
    tune_headroom: float = Field(0.3, gt=0.0, le=1.0)
    """Share of the constraint the tuner may spend; the rest absorbs overfitting and window noise
    (measured on the MiniLM replay: 0.5 broke 19/60 windows, 0.3 with ``backoff_after=1`` 9/60)."""
    init_step: float = Field(0.01, gt=0.0)
    """Greedy search: initial threshold step."""
    min_step: float = Field(0.001, gt=0.0)
    """Greedy search: stop once steps fall below this."""
    ramp_check_windows: int = Field(10, ge=1)
    """Run ramp adjustment every this many windows (Apparate NLP: every 100 batches)."""
    utility_windows: int = Field(20, ge=1)
    """Per-window ramp utilities kept for ramp adjustment (Apparate: last 20 batches)."""
    negative_share: float = Field(0.6, ge=0.0, lt=1.0)
    """Drop a ramp when more than this share of its recent utilities are negative (Apparate NLP)."""
    max_active: int | None = Field(None, ge=0)
    """Most active ramps (Apparate: 2 NLP, 3 CV); None = no count limit, only the tail budget."""
    max_tail_overhead: float = Field(0.05, ge=0.0)
    """Most extra cost the active ramps add to a row that never exits, as a share of the model."""
    adjust_ramps: bool = True
    """Turn ramp adjustment on or off (off: the active set never changes)."""
    backoff_after: int = Field(1, ge=1)
    """Consecutive violating windows that trigger a back-off (Apparate: 2; 1 = back off at once)."""
    backoff_factor: float = Field(0.1, ge=0.0, lt=1.0)
    """Back-off: thr = 1 - (1 - thr) * factor for violating ramps (Apparate's x0.1 cut)."""
    backoff_hold_windows: int = Field(4, ge=1)
    """Good windows in a row after which back-off floors are lifted."""
    early_guard: bool = True
    """Also check within a window, on every report once a quarter window is in: when the rows so far and
    the rest (forecast, see ``early_guard_prior_rows``) would break the window's budget, back off at once.
    Again on later reports in the same window if the rows since still break it."""
    early_guard_prior_rows: int = Field(96, ge=0)
    """The early guard forecasts the rest of a window at the disagreement rate of the rows so far, shrunk
    toward the tuner's target rate as if this many rows at that rate had been seen first (0 = forecast at
    the target rate alone: it then reacts only once the budget is nearly spent)."""
    early_hold_windows: int = Field(1, ge=0)
    """Good windows after which an early back-off's floors are lifted (a window-end back-off holds for
    ``backoff_hold_windows``): an early back-off acts on fewer rows, so it is more often noise."""
    history_limit: int = Field(1000, ge=1)
    """Per-window history rows kept in memory."""
    max_pending_rows: int = Field(65536, ge=1)
    """Most unprocessed feedback rows held; older rows are dropped beyond this (bounded memory)."""
    window_output_rows: int | None = Field(None, ge=1)
    """A window also closes once its feedback covers this many answered rows (reports say how many rows
    their feedback was drawn from), so the guard decides every this many answers however sparse the
    feedback. None: windows close on ``window_rows`` feedback rows only."""
    guard_alpha: float | None = Field(None, gt=0.0, lt=1.0)
    """The window-end guard's test. None: the window's disagreement against the budget (a short window
    against a whole window's budget). A value: an exact binomial test, valid at any window size: a
    violation when that many disagreements in that many rows has probability < alpha at a disagreement of
    exactly ``constraint``."""
    feedback_min: float = Field(0.0, ge=0.0, le=1.0)
    """Adaptive feedback, published with the state as ``feedback_fraction``: the share of rows workers
    also run to the end for the controller. ``feedback_min`` once the Wilson 95% upper bound of the
    disagreement served since the thresholds last changed is within the budget, ``feedback_max`` before
    (and after every change). 0 and 0: off."""
    feedback_max: float = Field(0.0, ge=0.0, le=1.0)
    """See ``feedback_min``."""

    def resolved(self) -> "TuningConfig":
        """This config with `window_rows` filled in when unset (from `constraint`, within `max_pending_rows`)."""
        if self.window_rows is not None:
            return self
        return self.model_copy(update={"window_rows": min(default_window_rows(self.constraint), self.max_pending_rows)})

    @model_validator(mode="after")
    def _consistent(self) -> "TuningConfig":
        if self.min_step > self.init_step:
            raise ValueError(f"need min_step ({self.min_step}) <= init_step ({self.init_step})")
        if self.window_rows is not None and self.max_pending_rows < self.window_rows:
            raise ValueError(f"max_pending_rows={self.max_pending_rows} must be >= window_rows={self.window_rows}")
        if self.feedback_min > self.feedback_max:
            raise ValueError(f"need feedback_min ({self.feedback_min}) <= feedback_max ({self.feedback_max})")
        return self


class ControllerSettings(_Strict):
    """How workers and replicas share the threshold controller (pipeline.control.controller)."""

    enabled: bool = True
    """Off: every worker keeps the artifact's thresholds."""
    share: bool = False
    """Off (default): the deployment has a controller of its own, named after it (`offramp-job-<job>-<run>`, or
    `offramp-serve-<model>`), removed when the job ends (its checkpoint stays; `--resume` restores from it).
    On: join the detached controller called `name` (default: one per model path), started by the first
    deployment that asks for it and kept until `offramp controllers --stop NAME`; joining one whose
    settings differ fails, naming them."""
    name: str | None = None
    """Actor name (default: derived from the job or the model path, see `share`)."""
    namespace: str = "offramp"
    checkpoint_url: str | None = None
    """fsspec URL where the controller checkpoints its state; restored when it restarts."""
    refresh_every_batches: int = Field(4, ge=1)
    """Workers fetch the controller's state every this many batches."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources for the controller actor (it takes no CPU), e.g. `{"node:__internal_head__": 0.01}`
    to keep it on the head node. A node lost with it restarts it elsewhere, from `checkpoint_url`."""
    warm_start: bool = True
    """A fresh controller (no checkpoint to restore) first tunes on the artifact's validation feedback
    (`validation_feedback.safetensors`, written by `offramp bootstrap`), when the artifact has it."""
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    """The controller's algorithm settings (TuningConfig); the fields set here override the
    deployment's (`constraint` defaults to the artifact's)."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for a missing or malformed file."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


OUTPUT_COLUMNS = ("id", "label", "label_id", "score", "exit_layer", "truncated", "error")


class InputSpec(_Strict):
    """What to classify."""

    url: str
    """parquet/jsonl/csv file, directory or glob on any fsspec URL (local, file://, memory://, s3://, gs://),
    or `builtin:NAME` for a packaged dataset (movie-reviews, trec, ...; written to parquet first)."""
    text_column: str = "text"
    """Column (a JSONL record's field) with the text to classify."""
    id_column: str | None = None
    """Column with row ids; default: stable ids `<file name>:<row number>` (rows counted from 0, blank JSONL lines
    skipped). A row whose id is null gets a null id."""
    passthrough: list[str] = Field(default_factory=list)
    """Input columns copied to the output unchanged."""
    rows_per_shard: int = Field(2048, ge=1)
    """Rows per unit of work / output part. Small inputs are cut finer so every actor gets work."""
    strict: bool = False
    """JSONL only. False: a line that is not JSON, not a JSON object, has no text field or a text that is not a
    string comes back as a row with an `error` naming its line (the summary's `errors_by_kind` counts them), and
    the job goes on. True: such a file fails the job before it starts (pyarrow's reader, one bad line fails it)."""

    @field_validator("passthrough")
    @classmethod
    def _no_clash(cls, v: list[str]) -> list[str]:
        clash = sorted(set(v) & set(OUTPUT_COLUMNS))
        if clash:
            raise ValueError(f"passthrough column(s) {clash} would overwrite prediction columns {OUTPUT_COLUMNS}; "
                             "rename them in the input")
        return v


class FilterSpec(_Strict):
    """Which answered rows the output keeps (NeMo Curator's `filter_by`); rows with an error are always kept."""

    labels: list[str] | None = None
    """Keep rows whose label is one of these (a multi-label answer: any of its labels)."""
    min_score: float | None = None
    """Keep rows whose `score` is at least this (a regression's score, else the answer's probability)."""
    max_score: float | None = None
    """Keep rows whose `score` is at most this."""

    @model_validator(mode="after")
    def _something(self) -> "FilterSpec":
        if self.labels is None and self.min_score is None and self.max_score is None:
            raise ValueError("output.filter keeps every row as written: give labels, min_score or max_score")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f"output.filter: min_score={self.min_score} > max_score={self.max_score} keeps nothing")
        return self


class OutputSpec(_Strict):
    url: str
    """Directory (fsspec URL) for `part-NNNNNN.parquet` files and `_offramp_summary.json`."""
    probabilities: bool = False
    """Add every label's score as a column `prob_<label>` (softmax probabilities; a multi-label head's sigmoid
    per label; a regression's raw score is the `score` column already)."""
    filter: FilterSpec | None = None
    """Keep only the rows this filter passes (the parts then carry each row's position in its shard, `row`);
    the summary counts the rows removed. The certificate covers every answer, before the filter."""


class ActorPoolSpec(_Strict):
    """The early-exit actor pool (Ray Data ActorPoolStrategy)."""

    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    num_cpus: float = Field(0.75, gt=0)
    """CPUs reserved per actor. Leave CPU for the tokenize tasks: an actor pool that takes every CPU
    starves the other stages and the job hangs."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per actor (1 = one actor per GPU). Actors fall back to CPU when torch sees no CUDA."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per actor, e.g. `{inference: 1}`: actors then run only on nodes started with
    `ray start --resources '{"inference": N}'` (N actors each)."""
    tokenize_cpus: float = Field(0.25, gt=0)
    """CPUs per tokenize task."""
    wait_for_actors_s: float = Field(120, gt=0)
    """Fail (instead of hanging) when the minimum number of actors cannot start within this time."""

    @model_validator(mode="after")
    def _sizes(self) -> "ActorPoolSpec":
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors={self.min_actors} > max_actors={self.max_actors}")
        return self


class CertifySpec(_Strict):
    """The accuracy promise of an offline job: at least 1 - constraint of its answered rows agree with the
    original model. The job calibrates its thresholds on its own rows before the bulk pass, audits the
    output as it goes, and reports the agreement with an interval (pipeline.offline.certificate)."""

    enabled: bool = True
    """Off: the artifact's (or the controller's) thresholds, the engine's shadow_fraction as feedback, and a
    point estimate in the summary, with no promise."""
    constraint: float | None = Field(None, gt=0, lt=1)
    """The promise: at most this share of the answered rows disagree with the float original model (default:
    the artifact's constraint). What the job calibrates, audits and certifies against; the controller guards
    the same budget (`controller.tuning.constraint`, if set, must equal it)."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Level of the reported two-sided exact interval; calibration certifies its thresholds with
    probability >= this (Learn then Test at delta = 1 - confidence)."""
    calibrate: bool = True
    """Off: the bulk pass starts from the engine's thresholds (the artifact's, or `engine.thresholds`) and
    only the audit and the certificate run: a promise checked, not a calibrated one."""
    calibration_rows: int | None = Field(None, ge=10)
    """Rows drawn uniformly from the corpus and run to the end before the bulk pass. Default: as many as it
    takes to certify thresholds whose disagreement is half the budget (1,499 at a 1% budget)."""
    max_calibration_share: float = Field(0.15, gt=0, le=1)
    """Calibration never takes more than this share of the job's rows (small jobs certify less boldly)."""
    audit_fraction: float | None = Field(None, gt=0, le=1)
    """Share of the bulk rows run to the end for the certificate (a Bernoulli sample by row position).
    Default: sized after calibration so the interval's lower end can clear the promise at the disagreement
    calibration measured, within [min_audit_fraction, max_audit_fraction]."""
    min_audit_fraction: float = Field(0.01, gt=0, le=1)
    max_audit_fraction: float = Field(0.25, gt=0, le=1)
    window_output_rows: int = Field(2048, ge=1)
    """The controller judges the output every this many answered rows (its windows), whatever the feedback
    rate; its guard is an exact binomial test at level 1 - confidence."""
    feedback_min: float = Field(0.02, ge=0, le=1)
    """The controller asks for this share of rows as feedback while it holds the certified thresholds..."""
    feedback_max: float = Field(0.1, ge=0, le=1)
    """...and this share while a guard back-off holds (the audit rows count toward both; pipeline.control.
    controller, hold mode)."""
    top_up: bool = True
    """When the interval's lower end misses the promise but the audit saw disagreement under the budget (an
    audit too small to tell), re-run a fresh uniform sample of the early-exit rows through the original
    model and certify on it (pipeline.offline.repair): more work only when the evidence is short."""
    on_uncertified: Literal["fail", "warn"] = "fail"
    """When the interval's lower end is under the promise: `fail` exits non-zero (the output is kept and the
    summary names the parts where disagreements were seen), `warn` only says so."""
    seed: int = 0
    """Seeds the calibration sample and the audit's row hash."""

    @model_validator(mode="after")
    def _ranges(self) -> "CertifySpec":
        if self.min_audit_fraction > self.max_audit_fraction:
            raise ValueError(f"min_audit_fraction={self.min_audit_fraction} > max_audit_fraction={self.max_audit_fraction}")
        if self.feedback_min > self.feedback_max:
            raise ValueError(f"feedback_min={self.feedback_min} > feedback_max={self.feedback_max}")
        return self


class LocalRaySpec(_Strict):
    """The embedded Ray started when no --address is given."""

    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    """Logical GPUs to declare (lets a CPU box test num_gpus placement)."""
    object_store_memory: int | None = Field(None, ge=78_643_200)


class JobConfig(_Strict):
    """An offline batch-inference job (`offramp run job.yaml`)."""

    name: str = "offramp-job"
    model: str
    """Early-exit artifact (from `offramp bootstrap`): a directory, or any fsspec URL (s3://, gs://, ...) that
    each node fetches once into its local cache."""
    input: InputSpec
    output: OutputSpec
    engine: EngineConfig = Field(default_factory=EngineConfig)
    actors: ActorPoolSpec = Field(default_factory=ActorPoolSpec)
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    certify: CertifySpec = Field(default_factory=CertifySpec)
    local_ray: LocalRaySpec = Field(default_factory=LocalRaySpec)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Endpoints and credentials for the job's URLs (s3://, gs://, ...): see StorageConfig."""
    resume: bool = False
    """Finish an interrupted job: keep finished parts, redo the rest."""

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "JobConfig":
        data = load_yaml(path)
        for key, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cls.model_validate(data)
