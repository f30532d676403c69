"""`offramp prune` end to end (subprocesses) on the tiny artifact: prune, then quantize the pruned artifact, then
`offramp inspect` shows the chain; the pruned model loads with plain from_pretrained."""
import json

from tests.e2e.cli import offramp


def test_prune_then_bf16_then_inspect_shows_both_steps(tmp_path, tiny_artifact):
    pruned, half = tmp_path / "pruned", tmp_path / "pruned-bf16"
    proc = offramp("prune", "--model", tiny_artifact, "--out", pruned, "--ffn", "0.5", "--recover-steps", "3",
                   "--importance-rows", "32", "--check-limit", "40", "--allow-loss")
    check = json.loads(proc.stdout)
    assert check["rows"] == 40 and 0 <= check["agreement"] <= 1
    assert "pruned ffn 64 -> 32 neurons per layer" in proc.stderr and "recover step" in proc.stderr
    manifest = json.loads((pruned / "manifest.json").read_text())
    assert manifest["original"] and manifest["compression"] is None
    p = manifest["pruning"]
    assert p["ffn"] == 0.5 and p["widths_after"]["ffn"] == 32 and p["recovery"]["steps"] == 3
    seen = dict(p["recovery"]["validation_agreement_by_step"])  # step 0 (no recovery) and the last step
    assert set(seen) == {0, 3} and seen[p["recovery"]["kept_step"]] == max(seen.values())
    assert abs(p["validation_agreement"] - max(seen.values())) < 1e-4  # the kept weights are the best step's
    assert p["importance"]["data"] == "movie-reviews:train" and p["check"]["rows"] == 40
    assert p["ramps"]["mode"] == "rebootstrap" and len(manifest["thresholds"]) == 3

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(pruned / "model")  # plain transformers, nothing else
    assert model.config.intermediate_size == 32
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape == (32, 32)

    offramp("quantize", "--model", pruned, "--method", "bf16", "--out", half, "--limit", "40", "--allow-loss")
    q = json.loads((half / "manifest.json").read_text())
    assert q["pruning"] == p and q["compression"]["method"] == "bf16"
    assert (half / q["original"]).resolve() == (pruned / manifest["original"]).resolve()  # still the float original
    assert q["compression"]["check"]["original_agreement"] is not None

    shown = offramp("inspect", half).stdout
    chain = shown[shown.index("float original:"):]
    assert "1. pruned (structured" in chain and "ffn 50% (64 -> 32 neurons per layer)" in chain
    assert "check vs the original" in chain and "2. bf16" in chain and "check vs the pruned float model" in chain
    assert chain.index("1. pruned") < chain.index("2. bf16")


def test_prune_refuses_heads_on_bert_naming_why_and_what_works(tmp_path, tiny_artifact):
    proc = offramp("prune", "--model", tiny_artifact, "--out", tmp_path / "p", "--heads", "0.5", check=False)
    assert proc.returncode != 0
    assert "BertConfig derives the head size" in proc.stderr and "--ffn" in proc.stderr
    assert not (tmp_path / "p").exists()
