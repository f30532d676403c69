"""Texts in, one prediction per text out: the worker-side engine shared by every path.

The loop reads schedule -> execute -> update (cf. vLLM EngineCore.step):
  schedule: validate rows, tokenize, sort by length, cut micro-batches under the token budget;
  execute:  run each micro-batch through the early-exit executor under the current ExitPolicy;
  update:   scatter answers back to the caller's order, collect feedback, adapt the budget.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch

from pipeline.config import EngineConfig
from pipeline.data.batching import pad_rows
from pipeline.engine.encoder import Encoded, TextEncoder
from pipeline.engine.executor import Tail, execute, finish_tail
from pipeline.engine.microbatch import MicroBatchQueue, TokenBudget, plan_microbatches
from pipeline.engine.policy import ExitPolicy
from pipeline.feedback import CLOSED, FeedbackWindow
from pipeline.model.heads import Decision

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    label: str | None
    """The answer as text: a label, a regression's bin ("3"), a multi-label set ("a,b"; "" for none)."""
    label_id: int
    """The answer's id (pipeline.model.heads): two answers agree when their ids are equal."""
    score: float
    exit_layer: int
    """Encoder layers run before the answer: 1..L-1 = a ramp, L = the original head, 0 = no answer."""
    truncated: bool = False
    error: str | None = None
    logits: np.ndarray | None = field(default=None, repr=False, compare=False)
    """[C] float32 logits of the ramp or head that answered, in the original head's space (None with an error):
    every label's score through `Predictor.head.label_scores`."""
    threshold_version: int | None = field(default=None, compare=False)
    """Version of the thresholds (ExitPolicy) the row was answered under."""

    def to_dict(self) -> dict:
        """The JSON-able fields (no logits)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "logits"}


@dataclass
class PredictOutput:
    predictions: list[Prediction]
    feedback: FeedbackWindow
    """Rows that ran to the end: every ramp's output and the original head's prediction."""
    stats: dict = field(default_factory=dict)
    feedback_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """[F] caller index of each feedback row, in the feedback window's order."""
    tails: list[Tail] = field(default_factory=list)
    """Release mode with defer_tail: the rest of each micro-batch's feedback (Predictor.finish_tail)."""
    original: FeedbackWindow | None = None
    """With a reference: the float original's own ramp records of the feedback rows, in `feedback`'s order."""

    def shadow_agreement(self) -> tuple[int, int]:
        """(agreeing, total) over feedback rows: released answer vs the original model's prediction (the float
        original's, when the predictor holds a reference)."""
        if not len(self.feedback):
            return 0, 0
        released = np.array([self.predictions[i].label_id for i in self.feedback_rows])
        return int((released == self.feedback.labels).sum()), len(self.feedback)


def _window(ramp_conf: torch.Tensor, ramp_pred: torch.Tensor, final_pred: torch.Tensor,
            reference: torch.Tensor | None = None) -> FeedbackWindow:
    return FeedbackWindow(ramp_conf.cpu().numpy(), ramp_pred.cpu().numpy(), final_pred.cpu().numpy(),
                          None if reference is None else reference.cpu().numpy())


def shadow_mask(keys: list, fraction: float) -> np.ndarray:
    """Deterministic per-row choice of shadow rows (same row, same choice, any batch)."""
    if fraction <= 0:
        return np.zeros(len(keys), bool)
    if fraction >= 1:
        return np.ones(len(keys), bool)
    h = np.array([zlib.crc32(str(k).encode("utf-8", "replace")) for k in keys], dtype=np.uint64)
    return (h / 2**32) < fraction


def key_uniforms(keys: list, salt: str = "") -> np.ndarray:
    """[n] a pseudo-random number in [0, 1) per key, fixed by the key and `salt` (blake2b, not crc32: a
    CRC of consecutive row numbers is far from uniform). `key_uniforms(keys, s) < f` picks a Bernoulli(f)
    sample of rows that is the same on every run and in every batch."""
    import hashlib

    out = np.empty(len(keys), np.float64)
    for i, k in enumerate(keys):
        d = hashlib.blake2b(f"{salt}|{k}".encode("utf-8", "replace"), digest_size=8).digest()
        out[i] = int.from_bytes(d, "little") / 2.0**64
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but torch sees no CUDA; running on CPU", name)
        return torch.device("cpu")
    return torch.device(name)


def fast_bf16_cpu() -> bool:
    """This CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16): measured ~5-15x float32 on MiniLM here."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_dtype(name: str, device: torch.device, half: str = "float16",
                  measured: bool = False) -> tuple[torch.dtype, str]:
    """(dtype, why). `auto`: on CUDA the family's half precision (`half`); on a CPU with fast bfloat16, bfloat16
    when its loss is `measured` against the float32 original (a certified job holds the original as its
    reference and counts the loss in its budget), else float32."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name], "engine.dtype"
    if device.type == "cuda":
        return getattr(torch, half), f"auto: {half} on CUDA"
    if measured and fast_bf16_cpu():
        return torch.bfloat16, "auto: this CPU has fast bfloat16 (AMX / AVX512-BF16); its loss is measured"
    return torch.float32, "auto: float32 on CPU" + ("" if fast_bf16_cpu() else " (no fast bfloat16 here)")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class _OncePerRow:
    """Wraps on_result so it fires once per row: a micro-batch retried after running out of memory may
    answer again rows a ramp already announced in the failed pass. `sent` keeps what each row was told."""

    def __init__(self, on_result: Callable[[int, Prediction], None]):
        self.on_result = on_result
        self.sent: dict[int, Prediction] = {}

    def __call__(self, i: int, prediction: Prediction) -> None:
        if i not in self.sent:
            self.sent[i] = prediction
            self.on_result(i, prediction)


class Predictor:
    """Loads an early-exit artifact once and classifies batches of texts.

    `reference`: when the model that runs is not the float original itself (a compressed artifact, or a
    float16 / bfloat16 dtype), also hold the float32 original and give every feedback row its answer
    (`FeedbackWindow.reference`), so agreement is measured against the original, never against the
    compressed model's own head. `exact` says whether answers of the running model's head are the original's."""

    def __init__(self, artifact: str, config: EngineConfig | None = None, reference: bool = False):
        from pipeline.engine.loader import load_artifact
        from pipeline.model.artifact import load_float_artifact, model_max_length, original_of, read_manifest
        from pipeline.model.families import half_dtype_of

        self.config = config or EngineConfig()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.device = resolve_device(self.config.device)
        manifest = read_manifest(artifact)
        # bfloat16 on a CPU only where a reference measures its loss, and not under a compression of its own
        self.dtype, self.dtype_reason = resolve_dtype(self.config.dtype, self.device, half_dtype_of(manifest.family),
                                                      measured=reference and not manifest.compression)
        from pipeline.compression import apply_at_load, compression_of, compression_status

        slow = self.config.slow_compression
        self.model, self.tokenizer, self.manifest = load_artifact(artifact, self.device, self.dtype, slow)
        if self.config.compression:  # a method named in the job/serve YAML, applied at load time
            apply_at_load(self.model, self.config.compression, slow)
        self.compression = compression_status(self.model)  # "none", the method, or why it was skipped here
        original = original_of(artifact)  # another artifact when this one's model was derived from it (pruned)
        self.exact = compression_of(self.model) is None and self.dtype == torch.float32 and original == str(artifact)
        """Answers of the running model's head are the float original's (up to float rounding)."""
        self.reference = None
        if reference and not self.exact:
            self.reference = load_float_artifact(original, self.device, torch.float32)[0]
        self.reference_seconds = 0.0
        """Time spent running the float original on feedback rows (`reference`), since construction."""
        self.model_seconds = 0.0
        """Time spent running the model itself, since construction."""
        self.max_length = min(self.config.max_length or 10**9, model_max_length(self.model.config, self.tokenizer))
        self.encoder = TextEncoder(self.tokenizer, self.max_length)
        thresholds = self.config.thresholds if self.config.thresholds is not None else self.manifest.thresholds
        if len(thresholds) != len(self.model.ramps):
            raise ValueError(f"{len(thresholds)} thresholds given for {len(self.model.ramps)} ramps")
        self.policy = ExitPolicy(np.asarray(thresholds), np.asarray(self.manifest.active))
        self.budget = TokenBudget(
            self.config.token_budget, self.config.max_token_budget, self.config.latency_target_s
        )
        self.head = self.model.head_kind  # what an answer is (pipeline.model.heads)
        self.label_names = self.head.label_names

    def use_original(self) -> None:
        """Answer with the float original from now on (`reference` becomes the model): a certified job's bulk
        when nothing could be certified for the running model."""
        if self.reference is None:
            return
        self.model, self.reference = self.reference, None
        self.exact, self.dtype, self.head = True, torch.float32, self.model.head_kind
        self.dtype_reason = "calibration chose the float original to answer"
        self.compression = f"none: the float original answers ({self.compression} could not keep the promise)"

    def drop_reference(self) -> None:
        """Stop running the float original on feedback rows (they measure against this model's own head from
        now on): a certified job whose calibration bounded this model's head against the original apart."""
        self.reference = None

    @property
    def shape_multiple(self) -> int:
        """`engine.shape_multiple`, else 8 where a new shape costs (half precision, compiled layers, CUDA) and 1 in
        float32 eager on a CPU (EngineConfig.shape_multiple); follows `use_original`."""
        from pipeline.compression import compression_of

        if self.config.shape_multiple is not None:
            return self.config.shape_multiple
        eager_fp32 = self.device.type == "cpu" and self.dtype == torch.float32 and compression_of(self.model) is None
        return 1 if eager_fp32 else 8

    @property
    def num_ramps(self) -> int:
        return len(self.model.ramps)

    def warm_up(self) -> float:
        """Run two tiny micro-batches through every layer and ramp; the seconds it took. A compiled model
        (the int8 artifact) compiles here, in a worker's or replica's constructor, rather than in its first
        real micro-batches: online, the first requests do not wait for a compile; offline, the compile
        overlaps the tokenizers' start-up (measured: the first 1,024-row shard of a job took 5.5 s instead of
        13.2 s; the job's total did not change beyond noise)."""
        t = time.perf_counter()
        enc = self.encoder.encode(["a short warm-up text of a few words", "warm"]).input_ids
        # Python floats as constants: LayerNorm's eps, traced as a symbol, makes dynamo trace each compiled
        # layer twice (a tensorify restart). Measured on one core: warm-up 4.9 s -> 2.9 s, the same graphs.
        import torch._dynamo

        cfg = {"specialize_float": True} if hasattr(torch._dynamo.config, "specialize_float") else {}
        with torch._dynamo.config.patch(**cfg):
            for seqs in (enc, enc[:1]):  # a batch of one is a graph of its own (dynamic shapes specialize 1)
                self._execute(seqs, np.zeros(len(seqs), bool), "release")  # release: every layer and ramp runs
        return time.perf_counter() - t

    def set_policy(self, policy: ExitPolicy) -> None:
        if len(policy.thresholds) != self.num_ramps:
            raise ValueError(f"policy has {len(policy.thresholds)} thresholds for {self.num_ramps} ramps")
        self.policy = policy

    # -- schedule ---------------------------------------------------------------------------
    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_rows(seqs, self.tokenizer.pad_token_id or 0, self.shape_multiple, self.max_length)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    # -- the loop -----------------------------------------------------------------------------
    def predict(self, texts: list, ids: list | None = None, mode: str | None = None,
                on_result: Callable[[int, Prediction], None] | None = None) -> PredictOutput:
        """One Prediction per text, in order. `on_result(i, prediction)` fires as soon as row i's
        answer is known (at its ramp, before the rest of its batch finishes), once per row."""
        keys = ids if ids is not None else [str(t) for t in texts]
        return self.predict_encoded(self.encoder.encode(texts), keys, mode, on_result)

    def predict_encoded(self, encoded: Encoded, keys: list, mode: str | None = None,
                        on_result: Callable[[int, Prediction], None] | None = None,
                        defer_tail: bool = False, shadow: np.ndarray | None = None,
                        policy: ExitPolicy | None = None, by_original: bool = False) -> PredictOutput:
        """Like predict, on rows already tokenized by a TextEncoder (keys pick the shadow rows).
        `defer_tail` (release mode): rows answered at a ramp are not run to the end here; the output's
        `tails` hold them, with the other non-shadow rows' feedback, for `finish_tail` (Serve runs them when
        the replica is idle).
        With `on_result`, a row's prediction is the one announced, even if its micro-batch then failed (it
        stays answered, not an error) or was retried after an OOM (feedback, tails and stats come from the
        retry, which can differ by float rounding).
        `shadow` [n] bool: the rows that run to the end as feedback (default: `shadow_fraction` of the keys).
        `policy`: these thresholds instead of the predictor's own. `by_original` (with every ramp closed, see
        `record_encoded`): feedback rows are answered by `reference`, when the predictor holds one."""
        mode = mode or self.config.mode
        if defer_tail and self.reference is not None:
            raise ValueError("a deferred release tail gets no reference answers; hold no reference, or do not defer")
        n = len(encoded)
        if on_result is not None:
            on_result = _OncePerRow(on_result)
        out: list[Prediction | None] = [None] * n
        for i, err in enumerate(encoded.errors):
            if err:
                out[i] = Prediction(None, -1, 0.0, 0, error=err)
                if on_result:
                    on_result(i, out[i])
        valid = [i for i in range(n) if out[i] is None]
        feedback: list = []
        original: list = []  # the float original's own ramp records of the feedback rows (with a reference)
        fb_rows: list = []
        tails: list[Tail] = []
        layer_rows = np.zeros(self.model.num_layers, np.int64)
        t0, ref0, model0 = time.perf_counter(), self.reference_seconds, self.model_seconds
        if valid:
            enc = [encoded.input_ids[i] for i in valid]
            truncated = encoded.truncated[valid]
            # Exit mode's feedback rows (and a deferred release tail's; plain release feeds back every row).
            shadow = (shadow_mask([keys[i] for i in valid], self.config.shadow_fraction) if shadow is None
                      else np.asarray(shadow, bool)[valid])
            lengths = np.array([len(e) for e in enc])
            pending = MicroBatchQueue(lengths, self.config.max_batch_rows, self.shape_multiple)
            while pending:
                idx = pending.pop(self.budget.value)  # the budget as of now: it adapts within a call
                tokens = len(idx) * int(lengths[idx].max())  # padded size, what the budget counts
                this = policy or self.policy  # one per micro-batch (set_policy may swap it from another thread)
                try:
                    start = time.perf_counter()
                    early = (self._early_callback(idx, valid, truncated, on_result, this.version) if on_result
                             else None)
                    res = self._execute([enc[j] for j in idx], shadow[idx], mode, early, defer_tail, this)
                    self.budget.observe(tokens, time.perf_counter() - start)
                except Exception as e:  # noqa: BLE001 - every row must get an answer or an error
                    if _is_oom(e) and len(idx) > 1 and self.budget.on_oom(tokens):
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()
                        log.warning("out of memory on %d rows; token budget now %d", len(idx), self.budget.value)
                        # Retry the same rows in smaller pieces (positions within idx -> rows).
                        parts = plan_microbatches(lengths[idx], self.budget.value, max(1, len(idx) // 2))
                        pending.retry_first([idx[p] for p in parts])
                        continue
                    log.exception("micro-batch of %d rows failed", len(idx))
                    for j in idx:
                        out[valid[j]] = Prediction(None, -1, 0.0, 0, bool(truncated[j]), f"inference failed: {e!r}")
                        if on_result:
                            on_result(valid[j], out[valid[j]])
                    continue
                self._update(res, idx, valid, truncated, out, feedback, original, layer_rows, on_result,
                             this.version, by_original)
                fb_rows += [valid[idx[k]] for k in res.feedback_rows.tolist()]
                if res.tail is not None:
                    tails.append(res.tail)
        elapsed = time.perf_counter() - t0
        if on_result is not None:  # the output says what each row was told (a retry can differ by rounding)
            for i, prediction in on_result.sent.items():
                out[i] = prediction
        stats = {
            "rows": n,
            "errors": sum(p.error is not None for p in out),
            "seconds": elapsed,
            "layer_rows": layer_rows.tolist(),
            "token_budget": self.budget.value,
            "policy_version": (policy or self.policy).version,
            "mode": mode,
            "reference_seconds": self.reference_seconds - ref0,
            "model_seconds": self.model_seconds - model0,
        }
        fb = FeedbackWindow.concat(feedback) if feedback else FeedbackWindow.empty(self.num_ramps)
        return PredictOutput(out, fb, stats, np.asarray(fb_rows, np.int64), tails,  # type: ignore[arg-type]
                             FeedbackWindow.concat(original) if original else None)

    def record_encoded(self, encoded: Encoded, keys: list) -> PredictOutput:
        """Every row run to the end with every ramp recorded (`feedback` holds them all, with the float
        original's answers as `reference` when the running model is not the original), and every row answered
        by the float original: the calibration sample of a certified job."""
        closed = ExitPolicy(np.full(self.num_ramps, CLOSED), self.policy.active, self.policy.version)
        return self.predict_encoded(encoded, keys, "exit", shadow=np.ones(len(encoded), bool), policy=closed,
                                    by_original=True)

    def finish_tail(self, tail: Tail, stop: Callable[[], bool] | None = None) -> tuple[FeedbackWindow, int] | None:
        """Run a deferred release tail to the end: (its feedback, how many of its answers agree with the
        original model), or None when `stop()` said other work waits first (its rows give no feedback)."""
        done = finish_tail(self.model, tail, stop)
        if done is None:
            return None
        agree = int((tail.label[done.rows] == done.final_pred).sum())
        return _window(done.ramp_conf, done.ramp_pred, done.final_pred), agree

    def _execute(self, seqs: list[list[int]], shadow: np.ndarray, mode: str, on_exit=None, defer_tail=False,
                 policy: ExitPolicy | None = None):
        input_ids, mask = self._pad(seqs)
        shadow_t = torch.from_numpy(shadow).to(self.device)
        policy = self.policy if policy is None else policy
        t = time.perf_counter()
        res = execute(self.model, input_ids, mask, policy, mode, shadow_t, on_exit=on_exit, defer_tail=defer_tail,
                      multiple=self.shape_multiple)
        self.model_seconds += time.perf_counter() - t
        if self.reference is not None and len(res.feedback_rows):
            t = time.perf_counter()
            rows = res.feedback_rows
            width = int(mask[rows].sum(1).max())  # right-padded: the rows' own longest
            # The float original with its own ramps recorded too (ramps cost ~nothing): a certified job's
            # calibration weighs answering with it instead.
            ref = execute(self.reference, input_ids[rows, :width], mask[rows, :width], ExitPolicy.closed(self.num_ramps),
                          "exit", torch.ones(len(rows), dtype=torch.bool, device=self.device))
            res.reference = Decision(ref.label, ref.score, ref.score, ref.logits)
            res.reference_window = _window(ref.ramp_conf, ref.ramp_pred, ref.final_pred)
            self.reference_seconds += time.perf_counter() - t
        return res

    def _early_callback(self, idx, valid, truncated, on_result, version: int):
        """Executor rows exiting at a ramp -> on_result(caller index, Prediction) right away."""

        def on_exit(rows, labels, scores, layer, logits):
            logits = logits.cpu().numpy()
            for n, (k, lid, sc) in enumerate(zip(rows.tolist(), labels.tolist(), scores.tolist())):
                j = idx[k]
                on_result(valid[j], Prediction(self.head.label(lid), lid, float(sc), layer, bool(truncated[j]),
                                               logits=logits[n], threshold_version=version))

        return on_exit

    def _update(self, res, idx, valid, truncated, out, feedback, original, layer_rows, on_result=None,
                version: int | None = None, by_original: bool = False) -> None:
        label, score, exit_layer = res.label.cpu().numpy(), res.score.cpu().numpy(), res.exit_layer.cpu().numpy()
        logits = res.logits.cpu().numpy()
        L = self.model.num_layers
        if by_original and res.reference is not None:  # feedback rows: the float original's answer
            rows, ref = res.feedback_rows.cpu().numpy(), res.reference
            label[rows], score[rows] = ref.answer.cpu().numpy(), ref.score.cpu().numpy()
            logits[rows], exit_layer[rows] = ref.logits.cpu().numpy(), L
        for k, j in enumerate(idx):
            lid = int(label[k])
            out[valid[j]] = Prediction(
                self.head.label(lid), lid, float(score[k]), int(exit_layer[k]), bool(truncated[j]),
                logits=logits[k], threshold_version=version,
            )
            if on_result and exit_layer[k] == L:  # ramp exits were already announced
                on_result(valid[j], out[valid[j]])
        if len(res.feedback_rows):
            ref = None if res.reference is None else res.reference.answer
            feedback.append(_window(res.ramp_conf, res.ramp_pred, res.final_pred, ref))
            if res.reference is not None:
                original.append(res.reference_window)
        layer_rows[: len(res.layer_rows)] += res.layer_rows
