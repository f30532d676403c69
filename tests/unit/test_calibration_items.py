"""The calibration sample's records as actors write them: whole only once every sampled row has landed, however
the rows were cut into batches (GPU actors batch by rows, so one shard's item can come in pieces)."""
import json

import pyarrow as pa
import pytest

from pipeline.offline.calibrate import TIMES, seconds_of, whole_sample, write_item


def _piece(shard: int, rows: list[int], model_seconds: float = 0.0) -> pa.Table:
    table = pa.table({"shard": pa.array([shard] * len(rows), pa.int64()), "row": pa.array(rows, pa.int64()),
                      "label_id": pa.array([r % 2 for r in rows], pa.int64())})
    seconds = {"model_seconds": model_seconds, "reference_seconds": 2 * model_seconds}
    return table.replace_schema_metadata({TIMES: json.dumps(seconds)})


def test_an_item_cut_in_pieces_is_whole_only_when_every_piece_landed(tmp_path):
    out = str(tmp_path / "out")
    write_item(out, _piece(0, [1, 5]))
    write_item(out, _piece(4, [2, 7]))
    assert whole_sample(out, 5) is None  # shard 0's row 9 is still missing
    write_item(out, _piece(0, [9]))
    table = whole_sample(out, 5)
    assert sorted(zip(table.column("shard").to_pylist(), table.column("row").to_pylist())) == [
        (0, 1), (0, 5), (0, 9), (4, 2), (4, 7)]


def test_overlapping_pieces_of_a_retried_batch_count_each_row_once(tmp_path):
    out = str(tmp_path / "out")
    write_item(out, _piece(0, [1, 5]))
    write_item(out, _piece(0, [5]))  # a retry cut the batch differently: row 5 twice, row 9 not yet
    assert whole_sample(out, 3) is None
    write_item(out, _piece(0, [9]))
    assert whole_sample(out, 3).column("row").to_pylist() == [1, 5, 9]


def test_the_whole_sample_keeps_the_seconds_of_every_piece(tmp_path):
    """The candidates' speeds come from the seconds each model took on the whole sample, not on its first piece."""
    out = str(tmp_path / "out")
    write_item(out, _piece(0, [1, 5], model_seconds=0.5))
    write_item(out, _piece(4, [2, 7, 8], model_seconds=1.5))
    assert seconds_of([whole_sample(out, 5)]) == pytest.approx({"model_seconds": 2.0, "reference_seconds": 4.0})
