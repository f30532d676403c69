"""Length-sorted padded batches, and the plain classifier run over them: padding must not change a row's answer."""
import numpy as np
import torch

from pipeline.data.batching import pad_rows, padded_batches


def test_pad_rows_right_pads_to_the_longest_row_with_a_matching_mask():
    ids, mask = pad_rows([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == np.int64


def test_padded_batches_cover_every_row_once_and_group_similar_lengths():
    rng = np.random.default_rng(0)
    rows = [list(range(1, int(n) + 1)) for n in rng.integers(1, 40, size=203)]
    seen, widths = [], []
    for idx, ids, mask in padded_batches(rows, pad_id=0, batch_size=16):
        assert len(idx) <= 16 and ids.shape == mask.shape == (len(idx), max(len(rows[i]) for i in idx))
        assert (mask.sum(1) == [len(rows[i]) for i in idx]).all()  # each row keeps all its tokens
        seen += idx.tolist()
        widths.append(ids.shape[1])
    assert sorted(seen) == list(range(203))
    assert widths == sorted(widths)  # shortest first: a batch pads only to its own longest row
    padded = sum(w * 16 for w in widths[:-1]) + widths[-1] * (203 % 16 or 16)
    assert padded < 1.1 * sum(len(r) for r in rows)  # vs ~2x for batches in input order


def test_classifier_logits_match_each_row_run_alone(tiny_model_dir):
    from pipeline.model.artifact import load_classifier, load_tokenizer
    from pipeline.model.classify import classifier_logits

    model, tok = load_classifier(tiny_model_dir), load_tokenizer(tiny_model_dir)
    texts = ["a short one", "a rather longer sentence with many more words in it than the others", "mid size text",
             "x"] * 5
    batched = classifier_logits(model, tok, texts, max_length=32, batch_size=8)
    with torch.inference_mode():
        alone = torch.cat([model(**tok([t], truncation=True, max_length=32, return_tensors="pt")).logits
                           for t in texts])
    assert batched.shape == (len(texts), model.config.num_labels)
    torch.testing.assert_close(batched, alone.float(), atol=1e-4, rtol=1e-4)
