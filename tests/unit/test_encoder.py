"""TextEncoder: the tokenize tasks' torch-free path gives the same rows as transformers' tokenizer."""
import subprocess
import sys

import pytest
from transformers import AutoConfig

from pipeline.engine.encoder import TextEncoder
from pipeline.model.artifact import load_tokenizer, model_max_length

EDGE = ["word " * 300, "x" * 5000, "héllo  Wörld 日本語 😀", "a\tb\nc", "[CLS] [SEP] [PAD]", None, 3, "  ", ""]


def _texts():
    from pipeline.data.datasets import load_dataset

    return list(load_dataset("movie-reviews").texts[:400]) + EDGE


class _SlowTokenizer:
    """A tokenizer without a `tokenizers` backend (like a Python-only one): called through transformers."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)


@pytest.mark.parametrize("max_length", [None, 16])
def test_artifact_encoder_matches_the_transformers_tokenizer(tiny_artifact, max_length):
    texts = _texts()
    enc = TextEncoder.from_artifact(tiny_artifact, max_length)
    assert enc.backend is not None and enc.tokenizer is None  # read from tokenizer.json, not through transformers
    out = enc.encode(texts)

    tok = load_tokenizer(f"{tiny_artifact}/model")
    limit = enc.max_length
    model_limit = model_max_length(AutoConfig.from_pretrained(f"{tiny_artifact}/model"), tok)
    assert limit == min(max_length or model_limit, model_limit)
    valid = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    ref = tok([texts[i] for i in valid], truncation=True, max_length=limit)["input_ids"]
    assert [out.input_ids[i] for i in valid] == ref
    assert [bool(out.truncated[i]) for i in valid] == [len(tok(texts[i])["input_ids"]) > limit for i in valid]
    assert out.truncated.sum() > (0 if max_length is None else 100)  # the cut is seen, not just allowed
    for i, t in enumerate(texts):
        if i not in valid:
            assert out.input_ids[i] == [] and out.errors[i] is not None and not out.truncated[i]

    slow = TextEncoder(_SlowTokenizer(tok), limit).encode(texts)  # the fallback path agrees too
    assert slow.input_ids == out.input_ids and (slow.truncated == out.truncated).all() and slow.errors == out.errors


def test_encoder_copies_a_fast_tokenizer_so_its_truncation_stays_its_own(tiny_artifact):
    tok = load_tokenizer(f"{tiny_artifact}/model")
    before = tok.backend_tokenizer.truncation
    TextEncoder(tok, 8).encode(["a text that is longer than eight tokens, by a fair margin"])
    assert tok.backend_tokenizer.truncation == before


def test_encoder_cuts_on_the_tokenizers_truncation_side(tiny_artifact):
    tok = load_tokenizer(f"{tiny_artifact}/model")
    text = "first words come here and the last words come there"
    tok.truncation_side = "left"
    left = TextEncoder(tok, 6).encode([text])
    assert left.input_ids[0] == tok(text, truncation=True, max_length=6)["input_ids"] and left.truncated[0]
    assert left.input_ids[0] != TextEncoder(tok, 6, truncation_side="right").encode([text]).input_ids[0]


def test_tokenize_path_imports_no_torch(tiny_artifact):
    # The offline job's tokenize tasks run this; importing torch would cost each task process ~2 s of CPU.
    code = (
        "import sys\n"
        "from pipeline.offline.worker import tokenize_shards\n"
        "from pipeline.engine.encoder import TextEncoder\n"
        f"out = TextEncoder.from_artifact({tiny_artifact!r}).encode(['a short review', None])\n"
        "assert out.input_ids[0] and out.errors[1], out\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False False"
