"""Compression on tiny random models: registry, int8 closeness, distilled students, artifact round trips."""
import json
import logging

import numpy as np
import pytest
import torch

from pipeline.compression import apply, compression_of, make_config, methods, to_record
from pipeline.compression.int8_onednn import available as onednn_available
from pipeline.compression.transforms import encoder_layers
from pipeline.training.distill import DistillConfig, choose_layers, distill, kd_loss, make_student
from pipeline.training.compression_check import sqnr_db
from pipeline.training.quantize import BudgetExceeded, quantize
from tests.tiny import tiny_classifier

logging.getLogger("torchao").setLevel(logging.ERROR)

FAST_INT8 = {"backend": "torch-ao"}  # fbgemm kernels: quick on tiny models; torchao is tested on a few rows
ONEDNN_INT8 = {"backend": "onednn"}
NEEDS_ONEDNN = pytest.mark.skipif(onednn_available() is not None, reason="oneDNN's int8 Linear needs x86 AVX2")


def _inputs(n=6, s=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 29000, (n, s), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, s // 2 :] = 0  # half the rows right-padded
    return ids, mask


@torch.inference_mode()
def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits.float()


def test_registry_names_and_errors():
    assert {"int8-dynamic", "fp16", "bf16"} <= set(methods())
    with pytest.raises(ValueError, match="unknown; use one of: int8-dynamic"):
        make_config("int4-magic")
    with pytest.raises(ValueError, match="unknown option"):
        make_config("int8-dynamic", bits=4)
    with pytest.raises(ValueError, match="backend"):
        make_config("int8-dynamic", backend="onnx")
    assert make_config("bf16").dtype == "bfloat16" and make_config("fp16").dtype == "float16"
    rec = to_record("int8-dynamic")
    assert rec["method"] == "int8-dynamic" and json.loads(json.dumps(rec)) == rec  # JSON-able, no pickle


@pytest.mark.parametrize("method,opts", [("int8-dynamic", FAST_INT8), ("fp16", {}), ("bf16", {})])
def test_each_method_applies_and_runs_on_cpu(method, opts):
    ids, mask = _inputs()
    ref = _logits(tiny_classifier(), ids, mask)
    model = apply(tiny_classifier(), method, make_config(method, **opts))
    assert compression_of(model)["method"] == method
    out = _logits(model, ids, mask)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    q = encoder_layers(model)[0].attention.self.query
    if method == "int8-dynamic":
        assert type(q).__module__.startswith("torch.ao.nn.quantized")  # swapped for the int8 kernel
        assert model.classifier.weight.dtype == torch.float32  # the head stays float
    else:
        assert q.weight.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[method]
    assert sqnr_db(ref, out) > 30


def test_apply_twice_is_refused_unless_identical():
    model = apply(tiny_classifier(), "bf16")
    assert apply(model, "bf16") is model  # same record: no-op
    with pytest.raises(ValueError, match="already compressed with bf16"):
        apply(model, "int8-dynamic", make_config("int8-dynamic", **FAST_INT8))


@pytest.mark.parametrize("opts,min_db", [({"backend": "torchao", "compile": False}, 25), (FAST_INT8, 20),
                                         pytest.param(ONEDNN_INT8, 25, marks=NEEDS_ONEDNN)])
def test_int8_linear_outputs_close_to_float(opts, min_db):
    """SQNR of every quantized encoder Linear against its float original (cf. torchao's compute_error)."""
    ref = tiny_classifier()
    q = apply(tiny_classifier(), "int8-dynamic", make_config("int8-dynamic", **opts))
    x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(0))
    qmods = dict(encoder_layers(q).named_modules())
    pairs = [(a, qmods[n]) for n, a in encoder_layers(ref).named_modules() if isinstance(a, torch.nn.Linear)]
    assert len(pairs) == 4 * 6  # q, k, v, attention out, intermediate, output per layer
    with torch.inference_mode():
        for a, b in pairs:
            xin = x if a.in_features == 32 else torch.randn(4, 7, a.in_features)
            assert sqnr_db(a(xin), b(xin)) > min_db
    ids, mask = _inputs(16)
    agree = (_logits(ref, ids, mask).argmax(-1) == _logits(q, ids, mask).argmax(-1)).float().mean()
    assert agree >= 0.9


def _int_reference(layer, x):
    """What OneDnnInt8Linear should compute, in float64: per-token 7-bit x (x ~= s*q + lo) times int8 W."""
    lo, hi = torch.aminmax(x, dim=1, keepdim=True)
    s = ((hi - lo) / 127).clamp(min=1e-12)
    q = torch.round((x - lo) / s)
    w = layer.weight.double()
    ws = w.abs().amax(1, keepdim=True) / 127
    return (s * q + lo).double() @ (torch.round(w / ws) * ws).T + layer.bias.double()


@NEEDS_ONEDNN
def test_onednn_int8_linear_is_exact_integer_math_and_per_token():
    """Every row quantized with its own scale, no int16 saturation in the u8 x s8 products (8-bit activations
    saturate on CPUs without VNNI), and a row's output does not depend on the rows batched with it."""
    from pipeline.compression.int8_onednn import OneDnnInt8Linear

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(384, 1536)
    with torch.no_grad():
        layer.weight.mul_(torch.where(torch.rand(1536, 384, generator=g) < 0.1, 40.0, 1.0))  # full-range int8
    x = torch.randn(300, 384, generator=g) * torch.rand(300, 1, generator=g) * 8 + torch.randn(384, generator=g)
    x[7] = 50 * x[7]  # an outlier token: a per-tensor scale would flatten every other row
    x[8] = 0.25  # a constant row
    int8 = OneDnnInt8Linear(layer)
    with torch.inference_mode():
        y = int8(x)
        ref = _int_reference(layer, x)
        # a q one step off at a rounding tie moves a row by ~4e-4; int16 saturation (8-bit q) moves it by ~0.3
        assert ((y.double() - ref).abs().amax(1) / ref.abs().amax(1)).max() < 5e-3
        assert torch.allclose(int8(x[:5]), y[:5], rtol=1e-5, atol=1e-4)  # the outlier row left out: same answers
        assert torch.allclose(int8(x.reshape(3, 100, 384)), y.reshape(3, 100, 1536))  # any leading shape
        assert int8(x[:0]).shape == (0, 1536)
        assert sqnr_db(layer(x), y) > 30


def test_onednn_backend_where_it_cannot_run(tiny_artifact, tmp_path, monkeypatch):
    """oneDNN's int8 Linear needs float32 weights on x86 AVX2: elsewhere (other CPUs, CUDA, bf16) loading keeps
    the float weights and says why, even when asked to apply slow methods; `offramp quantize` refuses up front."""
    import shutil

    from pipeline.compression import compression_status, slow_here
    from pipeline.engine.loader import load_artifact
    from pipeline.model.artifact import read_manifest

    rec = to_record("int8-dynamic", make_config("int8-dynamic", **ONEDNN_INT8))
    # runs (not "slow") exactly where oneDNN's int8 kernels exist: an x86 CPU with AVX2 or better
    assert (slow_here(rec, "cpu") is None) == (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    out = tmp_path / "onednn"
    shutil.copytree(tiny_artifact, out)
    manifest = read_manifest(out)
    manifest.compression = rec
    (out / "manifest.json").write_text(manifest.model_dump_json())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert "needs an x86 CPU with AVX2" in slow_here(rec, "cpu")
    assert slow_here(rec, "cuda") == "backend onednn runs on CPU only"  # a GPU node runs the float weights
    assert "needs float32" in slow_here(rec, "cpu", torch.bfloat16)
    for slow in ("skip", "apply"):
        skipped, _, _ = load_artifact(out, slow_compression=slow)
        assert compression_of(skipped) is None and "AVX2" in compression_status(skipped)
    with pytest.raises(ValueError, match="cannot run on cuda: backend onednn runs on CPU only"):
        quantize(tiny_artifact, str(tmp_path / "q"), "int8-dynamic", device="cuda", options=ONEDNN_INT8)
    with pytest.raises(ValueError, match="cannot run here: backend onednn needs float32 weights"):
        apply(tiny_classifier().to(torch.bfloat16), "int8-dynamic", make_config("int8-dynamic", **ONEDNN_INT8))


@NEEDS_ONEDNN
def test_quantize_picks_onednn_without_vnni(tiny_artifact, tmp_path, monkeypatch):
    """`offramp quantize --method int8-dynamic` with no backend on a CPU without AVX512-VNNI records onednn
    (torchao would be skipped at load there); a backend given explicitly is kept."""
    from pipeline.compression import compression_status
    from pipeline.engine.loader import load_artifact

    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    rec = quantize(tiny_artifact, str(tmp_path / "auto"), "int8-dynamic", limit=20, allow_loss=True)
    assert rec["config"]["backend"] == "onednn"
    assert compression_status(load_artifact(tmp_path / "auto")[0]) == "int8-dynamic"  # runs, not skipped
    rec = quantize(tiny_artifact, str(tmp_path / "asked"), "int8-dynamic", limit=20, allow_loss=True,
                   options=FAST_INT8, retune=False)
    assert rec["config"]["backend"] == "torch-ao"


def test_choose_layers():
    assert choose_layers(6, num_layers=3) == [0, 2, 4]  # DistilBERT: every other layer from the bottom
    assert choose_layers(12, num_layers=6) == [0, 2, 4, 6, 8, 10]
    assert choose_layers(4, keep_layers=[1, 3]) == [1, 3]
    for bad in ([3, 1], [0, 0], [5], []):
        with pytest.raises(ValueError, match="keep_layers"):
            choose_layers(4, keep_layers=bad)
    with pytest.raises(ValueError, match="num_layers=7"):
        choose_layers(6, num_layers=7)
    with pytest.raises(ValueError, match="exactly one"):
        DistillConfig()


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_student_keeps_requested_teacher_layers(family):
    from pipeline.model.families import backbone

    teacher = tiny_classifier(family, num_layers=4)
    student = make_student(teacher, [1, 3])
    t_layers, s_layers = backbone(teacher).modules, backbone(student).modules
    assert len(s_layers) == 2 and student.config.num_hidden_layers == 2
    for j, k in enumerate([1, 3]):
        ts, ss = t_layers[k].state_dict(), s_layers[j].state_dict()
        assert ts.keys() == ss.keys() and all(torch.equal(ts[n], ss[n]) for n in ts)
    # everything outside the layer list (embeddings, pooler, head) is the teacher's
    s_all, t_all = student.state_dict(), teacher.state_dict()
    outside = [n for n in s_all if ".layer." not in n]
    assert outside and all(torch.equal(s_all[n], t_all[n]) for n in outside)
    assert not torch.equal(s_layers[0].state_dict()[next(iter(ss))], t_layers[0].state_dict()[next(iter(ss))])


def test_kd_loss():
    t = torch.tensor([[2.0, -1.0], [0.5, 0.2]])
    assert kd_loss(t.clone(), t, None, 2.0, 0.5).abs() < 1e-6  # student == teacher, no labels: zero
    s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    soft = kd_loss(s, t, None, 3.0, 0.5)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / 3, -1), torch.softmax(t / 3, -1), reduction="batchmean") * 9
    assert torch.allclose(soft, ref)
    y = torch.tensor([1, 0])
    both = kd_loss(s, t, y, 3.0, 0.25)
    assert torch.allclose(both, 0.25 * ref + 0.75 * torch.nn.functional.cross_entropy(s, y))


def test_distill_saves_a_loadable_student_with_report(tiny_model_dir, tmp_path):
    from pipeline.model.artifact import load_classifier

    out = tmp_path / "student"
    report = distill(tiny_model_dir, str(out), DistillConfig(keep_layers=[0, 3], max_steps=2, limit=48, eval_limit=40))
    student = load_classifier(str(out))
    assert student.config.num_hidden_layers == 2 and (out / "model.safetensors").exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    saved = json.loads((out / "distill.json").read_text())
    assert saved == report and report["keep_layers"] == [0, 3] and report["steps"] == 2
    assert report["heldout_rows"] == 40 and 0 <= report["agreement_with_teacher"] <= 1
    assert report["student_accuracy"] is not None and report["hard_labels"]


@pytest.mark.parametrize("method,opts", [("int8-dynamic", FAST_INT8),
                                         pytest.param("int8-dynamic", ONEDNN_INT8, marks=NEEDS_ONEDNN),
                                         ("bf16", {}), ("fp16", {})])
def test_artifact_round_trip_reapplies_method(tiny_artifact, tmp_path, method, opts):
    from pipeline.engine.loader import load_artifact
    from pipeline.model.artifact import read_manifest
    from pipeline.training.compression_check import run_early_exit

    out = tmp_path / method
    rec = quantize(tiny_artifact, str(out), method, limit=40, allow_loss=True, options=opts)
    manifest = read_manifest(out)
    assert manifest.compression["method"] == method and manifest.compression["check"]["rows"] == 40
    assert manifest.compression == json.loads(json.dumps(rec))
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.pth"))

    loaded, tok, m2 = load_artifact(out)
    assert compression_of(loaded)["method"] == method
    fresh, _, m1 = load_artifact(tiny_artifact)
    assert compression_of(fresh) is None
    apply(fresh, method, make_config(method, **opts))
    texts = ["a fine film", "dull and long, with nothing to say", "ok"]
    a = run_early_exit(loaded, tok, texts, m2.thresholds, m2.active)
    b = run_early_exit(fresh, tok, texts, m1.thresholds, m1.active)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _fragile_classifier_dir(path):
    """A tiny random classifier whose decision margins are ~0 on real text: any perturbation flips some."""
    from pipeline.model.artifact import load_tokenizer
    from pipeline.model.classify import classifier_logits
    from pipeline.training.compression_check import heldout_texts
    from tests.tiny import save_tiny

    save_tiny(path, "bert", num_layers=2)
    from pipeline.model.artifact import load_classifier

    model, tok = load_classifier(str(path)), load_tokenizer(str(path))
    _, texts, _ = heldout_texts("movie-reviews", 120)
    margin = classifier_logits(model, tok, texts, 128) @ torch.tensor([-1.0, 1.0])
    with torch.no_grad():
        model.classifier.bias[1] -= float(margin.median())  # half the rows on each side, all near the boundary
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def test_quantize_budget_refuses_then_allow_loss_writes(tmp_path):
    src = _fragile_classifier_dir(tmp_path / "fragile")
    out = tmp_path / "out"
    with pytest.raises(BudgetExceeded, match="over the budget") as e:
        quantize(src, str(out), "bf16", limit=120, budget=0.0)
    assert e.value.record["check"]["agreement"] < 1.0 and not out.exists()  # nothing written
    rec = quantize(src, str(out), "bf16", limit=120, budget=0.0, allow_loss=True)
    saved = json.loads((out / "compression.json").read_text())
    assert saved["check"]["within_budget"] is False and saved == json.loads(json.dumps(rec))
    from pipeline.training.quantize import load_compressed_classifier

    assert compression_of(load_compressed_classifier(str(out)))["method"] == "bf16"
    with pytest.raises(ValueError, match="already compressed"):
        quantize(str(out), str(tmp_path / "again"), "bf16", limit=10)
    with pytest.raises(ValueError, match="not an earlier"):
        quantize(src, src + "/..", "bf16", limit=10)


def test_engine_config_quantize_field():
    from pydantic import ValidationError

    from pipeline.config import EngineConfig

    assert EngineConfig(compression="int8-dynamic").compression == "int8-dynamic"
    assert EngineConfig(quantize="int8-dynamic").compression == "int8-dynamic"  # the old name still reads
    assert EngineConfig().compression is None
    with pytest.raises(ValidationError, match="int8-dynamic"):
        EngineConfig(quantize="int3")


def test_int8_agreement_on_real_text_tiny_model(tiny_model_dir):
    """Agreement with the float model on movie reviews (tiny random model: a loose bound, the bench has the real one)."""
    from pipeline.model.artifact import load_classifier, load_tokenizer
    from pipeline.model.classify import classifier_logits
    from pipeline.training.compression_check import heldout_texts

    tok = load_tokenizer(tiny_model_dir)
    _, texts, _ = heldout_texts("movie-reviews", 64)
    ref = classifier_logits(load_classifier(tiny_model_dir), tok, texts, 128)
    q = apply(load_classifier(tiny_model_dir), "int8-dynamic", make_config("int8-dynamic", **FAST_INT8))
    out = classifier_logits(q, tok, texts, 128)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    assert np.isfinite(sqnr_db(ref, out))


@pytest.mark.compiles
def test_default_int8_torchao_compiled_round_trip(tiny_artifact, tmp_path):
    """The default int8 (torchao + torch.compile) re-applied by load_artifact from a manifest record (one compile)."""
    pytest.importorskip("torchao")
    from pipeline.engine.loader import load_artifact
    from pipeline.training.compression_check import run_early_exit

    cfg = make_config("int8-dynamic")
    assert cfg.backend == "torchao" and cfg.compile
    out = _int8_copy(tiny_artifact, tmp_path)
    loaded, tok, m = load_artifact(out, slow_compression="apply")  # its kernels, whatever this CPU has
    assert compression_of(loaded)["config"] == {"backend": "torchao", "per_channel": True, "compile": True}
    texts = ["a fine film", "dull and long, with nothing to say at all"]
    a = run_early_exit(loaded, tok, texts, m.thresholds, m.active)
    fresh, _, _ = load_artifact(tiny_artifact)
    ref = run_early_exit(fresh, tok, texts, m.thresholds, m.active)
    assert sqnr_db(ref[0], a[0]) > 20 and torch.isfinite(a[0]).all()


def _int8_copy(artifact, tmp_path, **opts):
    """The artifact with int8 recorded in its manifest (default: torchao + torch.compile)."""
    import shutil

    from pipeline.model.artifact import read_manifest

    out = tmp_path / "int8"
    shutil.copytree(artifact, out)
    manifest = read_manifest(out)
    manifest.compression = to_record("int8-dynamic", make_config("int8-dynamic", **opts))
    (out / "manifest.json").write_text(manifest.model_dump_json())
    return out


def test_int8_without_fast_cpu_kernels_runs_the_float_weights_unless_asked(tiny_artifact, tmp_path, monkeypatch):
    """torchao's int8 matmul on a CPU without AVX512-VNNI is torch's reference loop (~17x slower than float32):
    loading skips it, keeps the float model's answers and says why; `apply` (and a VNNI CPU) compresses."""
    pytest.importorskip("torchao")
    import shutil

    from pipeline.compression import apply_at_load, compression_status, slow_here
    from pipeline.config import EngineConfig
    from pipeline.engine.loader import load_artifact
    from pipeline.engine.predictor import Predictor
    from pipeline.model.artifact import read_manifest
    from pipeline.training.compression_check import run_early_exit

    out = tmp_path / "int8-eager"  # eager torchao: the same kernels as compiled, without the compile time
    shutil.copytree(tiny_artifact, out)
    manifest = read_manifest(out)
    manifest.compression = to_record("int8-dynamic", make_config("int8-dynamic", compile=False))
    (out / "manifest.json").write_text(manifest.model_dump_json())
    texts = ["a fine film", "dull and long, with nothing to say at all", "ok"]
    fresh, tok, m = load_artifact(tiny_artifact)
    ref = run_early_exit(fresh, tok, texts, m.thresholds, m.active)

    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    assert "AVX512-VNNI" in slow_here("int8-dynamic", "cpu")
    assert ("--backend onednn" in slow_here("int8-dynamic", "cpu")) == (onednn_available() is None)
    assert slow_here(to_record("int8-dynamic", make_config("int8-dynamic", **FAST_INT8)), "cpu") is None  # fbgemm
    assert slow_here("int8-dynamic", "cuda") is None and slow_here("bf16", "cpu") is None
    skipped, _, _ = load_artifact(out)
    assert compression_of(skipped) is None
    assert compression_status(skipped).startswith("int8-dynamic skipped: this CPU has no AVX512-VNNI")
    for x, y in zip(run_early_exit(skipped, tok, texts, m.thresholds, m.active), ref):
        assert torch.equal(x, y)  # the float model's answers
    assert Predictor(str(out)).compression.startswith("int8-dynamic skipped: this CPU has no AVX512-VNNI")
    with pytest.raises(ValueError, match="already compressed with 'int8-dynamic'"):
        apply_at_load(skipped, "bf16")  # as where int8 runs: one method per model
    assert apply_at_load(skipped, "int8-dynamic") is skipped and compression_of(skipped) is None
    asked = Predictor(tiny_artifact, EngineConfig(quantize="int8-dynamic"))  # the engine's quantize, same rule
    assert asked.compression.startswith("int8-dynamic skipped: this CPU has no AVX512-VNNI")
    forced = Predictor(str(out), EngineConfig(slow_compression="apply"))
    assert forced.compression == "int8-dynamic" == compression_status(forced.model)
    int8 = run_early_exit(forced.model, tok, texts, m.thresholds, m.active)
    assert not torch.equal(int8[0], ref[0]) and sqnr_db(ref[0], int8[0]) > 20

    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)
    assert slow_here("int8-dynamic", "cpu") is None
    assert compression_status(load_artifact(out)[0]) == "int8-dynamic"
    assert compression_status(fresh) == "none"


@pytest.mark.compiles
@pytest.mark.parametrize("opts", [{}, pytest.param(ONEDNN_INT8, marks=NEEDS_ONEDNN)])
def test_warm_up_compiles_every_graph_real_batches_need(tiny_artifact, tmp_path, opts):
    """After Predictor.warm_up, micro-batches of any size and length (one row included) compile nothing."""
    if not opts:
        pytest.importorskip("torchao")
    from torch._dynamo.utils import counters

    from pipeline.config import EngineConfig
    from pipeline.engine.predictor import Predictor

    torch._dynamo.reset()  # graphs compiled by earlier tests would otherwise be reused
    p = Predictor(str(_int8_copy(tiny_artifact, tmp_path, **opts)),
                  EngineConfig(token_budget=64, max_batch_rows=4, slow_compression="apply"))
    graphs = counters["stats"]["unique_graphs"]
    p.warm_up()
    assert counters["stats"]["unique_graphs"] > graphs, "warm-up should compile the layers"
    graphs = counters["stats"]["unique_graphs"]
    texts = ["a fine film", "dull", "one of the best movies of the year, truly moving", "meh", "not good"] * 3
    out = p.predict(texts)
    p.predict(["one"])
    assert all(x.error is None for x in out.predictions)
    assert counters["stats"]["unique_graphs"] == graphs


def test_apply_at_load_for_engine_config():
    from pipeline.compression import apply_at_load

    model = tiny_classifier()
    assert apply_at_load(model, None) is model and compression_of(model) is None
    apply_at_load(model, "bf16")
    assert compression_of(model)["method"] == "bf16"
    assert apply_at_load(model, "bf16") is model  # already there (e.g. recorded in the artifact)
    with pytest.raises(ValueError, match="already compressed with 'bf16'"):
        apply_at_load(model, "fp16")


def test_cli_method_choices_match_registry():
    from pipeline.commands import compression as commands
    from pipeline.compression import transforms
    from pipeline.config import COMPRESSION_METHODS

    assert set(commands.METHODS) == set(methods()) == set(COMPRESSION_METHODS)
    assert commands.INT8_BACKENDS == transforms.INT8_BACKENDS


def test_quantize_retunes_artifact_thresholds_against_the_float_source(tiny_artifact, tmp_path):
    """The compressed artifact's thresholds are tuned on its own ramps, labelled with the float source's answers."""
    from pipeline.model.artifact import load_validation_feedback, read_manifest

    out = tmp_path / "retuned"
    rec = quantize(tiny_artifact, str(out), "bf16", limit=40, allow_loss=True)
    rt = rec["retune"]
    src, m = read_manifest(tiny_artifact), read_manifest(out)
    assert rt["previous_thresholds"] == src.thresholds
    assert rt["rows"] == src.bootstrap["validation_rows"] and rt["data"].endswith(":validation")
    # Every tuned move kept the agreement with the float source within the budget (or did not worsen it).
    assert 1 - rt["validation_agreement"] <= max(rt["constraint"], 1 - rt["validation_final_agreement"]) + 1e-9
    assert 0 <= rt["check_exit_agreement"] <= 1 and m.compression["retune"] == rt
    conf, pred, final = load_validation_feedback(out, num_ramps=len(m.ramps))
    src_conf, _, _ = load_validation_feedback(tiny_artifact, num_ramps=len(src.ramps))
    assert conf.shape == src_conf.shape and not np.array_equal(conf, src_conf)  # the bf16 model's own outputs

    kept = tmp_path / "kept"
    rec = quantize(tiny_artifact, str(kept), "bf16", limit=40, allow_loss=True, retune=False)
    assert "retune" not in rec and read_manifest(kept).thresholds == src.thresholds
    # Not re-tuned: no validation feedback of its own, and never the float ramps' (a warm start would use it).
    assert load_validation_feedback(kept, num_ramps=len(src.ramps)) is None


def test_controller_spends_only_the_budget_compression_left(tiny_artifact):
    """The controller sees the compressed model's own final head: it gets the constraint less the check's loss."""
    from pipeline.config import TuningConfig
    from pipeline.control.deployment import controller_constraint
    from pipeline.model.artifact import read_manifest

    m = read_manifest(tiny_artifact)
    assert controller_constraint(m) == m.constraint
    m.compression = {"method": "int8-dynamic", "check": {"agreement_loss": 0.0047}}
    assert controller_constraint(m) == pytest.approx(m.constraint - 0.0047)
    m.compression = {"method": "bf16", "check": {"agreement_loss": 0.03}}  # kept with --allow-loss
    assert controller_constraint(m) == 0.0
    TuningConfig(constraint=controller_constraint(m))  # a valid (close-everything) controller
