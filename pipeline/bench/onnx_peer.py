"""The strongest single-machine peer we compare against: ONNX Runtime, int8 dynamic quantization,
length-sorted batches. Export -> quantize -> run; used by the offline benchmark only."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.data.batching import padded_batches


KINDS = ("fp32", "int8-per-tensor", "int8-per-channel")


def export(model_dir: str, out_dir: str, kind: str = "int8-per-tensor") -> str:
    """The classifier exported to ONNX (TorchScript exporter, dynamic batch/sequence), as float32 or quantized
    int8 dynamic with one weight scale per tensor or per output channel; cached in `out_dir`."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification

    if kind not in KINDS:
        raise ValueError(f"ONNX peer kind {kind!r} is not one of {KINDS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "model.onnx"
    path = {"fp32": fp32, "int8-per-tensor": out / "model.int8.onnx",
            "int8-per-channel": out / "model.int8-per-channel.onnx"}[kind]
    if path.exists():
        return str(path)
    if not fp32.exists():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, attn_implementation="eager").eval()
        ids = torch.ones(2, 16, dtype=torch.long)
        with torch.inference_mode():
            torch.onnx.export(
                model, (ids, torch.ones_like(ids)), str(fp32), dynamo=False, opset_version=17,
                input_names=["input_ids", "attention_mask"], output_names=["logits"],
                dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "logits": {0: "b"}},
            )
    if kind != "fp32":
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=kind == "int8-per-channel")
    return str(path)


def export_int8(model_dir: str, out_dir: str) -> str:
    """`export` as int8 dynamic, one weight scale per tensor (ONNX Runtime's default)."""
    return export(model_dir, out_dir, "int8-per-tensor")


def run_onnx(onnx_path: str, tokenizer, texts: list[str], batch_size: int = 64, threads: int = 2,
             max_length: int = 512) -> tuple[np.ndarray, float]:
    """Predictions in input order and seconds (tokenization included), on length-sorted batches."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    preds = np.empty(len(texts), np.int64)
    for idx, ids, mask in padded_batches(enc, tokenizer.pad_token_id or 0, batch_size):
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        preds[idx] = logits.argmax(-1)
    return preds, time.perf_counter() - t
