"""Messy JSONL: every non-blank line is a row, a bad one with an error naming its line; strict reading on request."""
import gzip
import io
import json

import pyarrow as pa
import pyarrow.json as pajson
import pytest

from pipeline.data.readers import ROW_ERROR, read_jsonl, read_table, require_columns, row_errors
from pipeline.data.texts import ERROR_KINDS, error_kind, validate_text
from pipeline.offline.shards import Shard, _count_rows, plan_shards, read_shard, row_ids

MESSY = (
    b'{"id": "a", "text": "a fine film", "stars": 4}\n'  # line 1
    b'{"id": "b", "text": "broken" "stars": 2}\n'  # 2: not JSON
    b'{"id": "c", "text": 12, "stars": 1}\n'  # 3: a number as text
    b"\n"  # 4: blank, skipped
    b'{"id": "d", "body": "no text here", "stars": 3}\n'  # 5: no text field
    b'["not", "an", "object"]\n'  # 6
    b'   \n'  # 7: blank
    b'{"id": "e", "text": null, "stars": 5}\n'  # 8: null text: a row like any other
    b'{"id": "f", "text": "the last one", "stars": 2}'  # 9, no final newline
)
ERRORS = [None, "line 2: not valid JSON (Expecting ',' delimiter: column 30)",
          "line 3: text is int, not a string; convert it to str first", "line 5: no 'text' field",
          "line 6: not a JSON object but an array", None, None]


def _read(data: bytes, text_column="text") -> pa.Table:
    return read_jsonl(io.BytesIO(data), text_column)


def test_every_non_blank_line_is_one_row_and_bad_ones_name_their_line():
    table = _read(MESSY)
    assert table.num_rows == 7 and row_errors(table) == ERRORS
    assert table.column("text").to_pylist() == ["a fine film", None, None, None, None, None, "the last one"]
    # records keep their other columns (the id finds them); a line that is no record has nulls
    assert table.column("id").to_pylist() == ["a", None, "c", "d", None, "e", "f"]
    assert table.column("stars").to_pylist() == [4, None, 1, 3, None, 5, 2]
    assert [error_kind(e) for e in ERRORS if e] == ["malformed_json", "text_not_string", "missing_text",
                                                    "not_an_object"]


def test_a_clean_file_is_pyarrows_table_as_it_is():
    clean = b"\n".join(json.dumps({"text": f"t{i}", "n": i, "day": "2024-01-02"}).encode() for i in range(50))
    table = _read(clean + b"\n\n")
    assert table.equals(pajson.read_json(io.BytesIO(clean)))  # types too (pyarrow's timestamp inference)
    assert ROW_ERROR not in table.column_names and row_errors(table) == [None] * 50


def test_null_text_and_missing_text_differ_on_the_fast_path():
    table = _read(b'{"text": "x"}\n\n{"text": null}\n{"other": 1}\n')  # pyarrow reads it: nulls looked up
    assert table.column("text").to_pylist() == ["x", None, None]
    assert row_errors(table) == [None, None, "line 4: no 'text' field"]
    assert validate_text(None).startswith("text is null")  # the null one is the encoder's to report


def test_gzipped_jsonl_reads_the_same(tmp_path):
    import fsspec

    (tmp_path / "messy.jsonl.gz").write_bytes(gzip.compress(MESSY))
    (tmp_path / "messy.jsonl").write_bytes(MESSY)
    fs = fsspec.filesystem("file")
    from pipeline.data.readers import _read_one

    plain, zipped = (_read_one(fs, str(tmp_path / f), "text") for f in ("messy.jsonl", "messy.jsonl.gz"))
    assert zipped.equals(plain) and row_errors(zipped) == ERRORS


@pytest.mark.parametrize("name", ["messy.jsonl", "messy.jsonl.gz"])
def test_planned_rows_are_the_rows_read_shard_by_shard(tmp_path, name):
    import fsspec

    data = (MESSY + b"\n") * 5  # 45 lines, 35 rows, a bad line every few
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    whole = _read(data)
    assert _count_rows(fsspec.filesystem("file"), str(tmp_path / name), "text") == whole.num_rows == 35
    shards = plan_shards(str(tmp_path / name), rows_per_shard=8, text_column="text")
    assert [s.rows for s in shards] == [8, 8, 8, 8, 3]
    parts = [read_shard(s, "text") for s in shards]
    assert sum(p.num_rows for p in parts) == 35
    assert [e for p in parts for e in row_errors(p)] == row_errors(whole)
    # line numbers count the file's physical lines (9 a copy), blank ones too
    assert row_errors(parts[1])[:3] == [ERRORS[1].replace("line 2", "line 11"), ERRORS[2].replace("line 3", "line 12"),
                                        "line 14: no 'text' field"]
    ids = [i for s, p in zip(shards, parts) for i in row_ids(p, s, None)]
    assert ids == [f"{name}:{i}" for i in range(35)]
    assert [i for s, p in zip(shards, parts) for i in row_ids(p, s, "id")][:3] == ["a", None, "c"]  # null id


def test_strict_reading_fails_the_file_with_pyarrows_message(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "a"}\n{"text": 12}\n')
    with pytest.raises(ValueError, match=r"cannot read .*in.jsonl' as jsonl: .*changed from string to number"):
        plan_shards(str(tmp_path / "in.jsonl"), rows_per_shard=8)
    with pytest.raises(ValueError, match="cannot read"):
        read_table(str(tmp_path / "in.jsonl"))  # local tools read strictly
    assert plan_shards(str(tmp_path / "in.jsonl"), rows_per_shard=8, text_column="text")[0].rows == 2


def test_job_config_input_strict_defaults_off():
    from pipeline.config import InputSpec

    assert InputSpec(url="x.jsonl").strict is False and InputSpec(url="x.jsonl", strict=True).strict is True


def test_text_in_no_record_is_still_a_missing_column():
    table = _read(b'{"body": "a"}\n{"body": 1, "x": 2}\nnot json\n')
    assert "text" not in table.column_names and table.num_rows == 3
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body', 'x'\]\)"):
        require_columns(table, ["text"], "in.jsonl")


def test_no_json_object_at_all_is_not_a_jsonl_file(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"id,text\n1,hello\n")
    with pytest.raises(ValueError, match=r"as jsonl: none of its 2 lines is a JSON object \(line 1: not valid JSON"):
        plan_shards(str(tmp_path / "in.jsonl"), rows_per_shard=8, text_column="text")


def test_odd_lines_other_columns_and_encodings():
    table = _read(b'\xef\xbb\xbf{"text": "bom", "k": 1}\r\n'  # a BOM, CRLF line ends
                  b'{"text": "caf\xe9", "k": "two"}\r\n'  # latin-1, not UTF-8
                  b'{"text": {"nested": 1}, "k": [3]}\r\n'
                  b'{"text": "two on a line"} {"text": "x"}\r\n'
                  b'{"text": true}\r\n'
                  b'7\r\n')
    assert row_errors(table) == [
        None, "line 2: not valid JSON (not UTF-8: byte 0xe9 at column 14)",
        "line 3: text is dict, not a string; convert it to str first",
        "line 4: not valid JSON (Extra data: column 27)",
        "line 5: text is bool, not a string; convert it to str first", "line 6: not a JSON object but a number"]
    # a column pyarrow cannot type as one keeps its values as strings (JSON where they were not strings)
    assert table.column("k").to_pylist() == ["1", None, "[3]", None, None, None]
    assert table.column("text").to_pylist() == ["bom", None, None, None, None, None]


def test_empty_and_blank_files_have_no_rows():
    assert _read(b"").num_rows == 0 and _read(b"\n \n\n").num_rows == 0


def test_every_error_the_pipeline_writes_has_a_kind():
    messages = [validate_text(v) for v in (None, 5, 2.5, [], "", "  ")]
    messages += [e for e in row_errors(_read(MESSY)) if e]
    messages += row_errors(_read(b'{"text": "a"}\n{"text": "\xff"}\n{"text": false}\n"s"\nnull\n{}\n'))
    messages += ["inference failed: RuntimeError('CUDA error: device-side assert')"]
    kinds = [error_kind(m) for m in messages if m]
    assert "other" not in kinds
    assert set(kinds) == {k for k, _ in ERROR_KINDS}
    assert error_kind("something new") == "other"


def test_tokenize_keeps_every_row_in_place_and_the_reader_error_wins(tmp_path, tiny_artifact):
    from pipeline.offline.worker import tokenize_shards

    (tmp_path / "in.jsonl").write_bytes(MESSY)
    shard = Shard(0, str(tmp_path / "in.jsonl"), 0, 7)
    out = tokenize_shards(pa.Table.from_pylist([shard.to_dict()]), tiny_artifact, "text", "id", ["stars"], None)
    assert out.column("row").to_pylist() == list(range(7))
    errors = out.column("error").to_pylist()
    assert errors[:5] == ERRORS[:5]  # not the encoder's "text is null" for lines that were no text
    assert errors[5].startswith("text is null") and errors[6] is None
    assert [len(x) > 0 for x in out.column("input_ids").to_pylist()] == [True] + [False] * 5 + [True]
    assert out.column("id").to_pylist() == ["a", None, "c", "d", None, "e", "f"]
    assert out.column("stars").to_pylist() == [4, None, 1, 3, None, 5, 2]


def test_calibration_rows_get_the_reader_error_too(tmp_path, tiny_artifact):
    from pipeline.config import EngineConfig
    from pipeline.offline.calibrate import run_full_depth

    (tmp_path / "in.jsonl").write_bytes(MESSY)
    shard = Shard(0, str(tmp_path / "in.jsonl"), 0, 7)
    out = run_full_depth(tiny_artifact, EngineConfig().model_dump(), "text", None, [(shard.to_dict(), [0, 1, 3, 5])])
    errors = out.column("error").to_pylist()
    assert errors[:3] == [None, ERRORS[1], ERRORS[3]] and errors[3].startswith("text is null")
    assert out.column("id").to_pylist() == ["in.jsonl:0", "in.jsonl:1", "in.jsonl:3", "in.jsonl:5"]
