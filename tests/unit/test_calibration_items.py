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


def test_the_sample_goes_to_the_actors_in_a_few_groups_of_equal_rows_each_row_once(tmp_path, tiny_artifact):
    """Two items per actor instead of one per shard (a shard's ~30 rows a batch ran both models 1.4x slower per row):
    consecutive shards' rows together, every sampled row in exactly one item, read back by the tokenize stage."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.offline.calibrate import calibration_items, sample_rows
    from pipeline.offline.shards import plan_shards
    from pipeline.offline.worker import tokenize_shards

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(2000)], "text": [f"text {i}" for i in range(2000)]}), path)
    shards = plan_shards(str(path), 100)
    sample = sample_rows(shards, 300, seed=1)
    items = calibration_items(shards, sample, 4)
    sizes = [sum(len(g["positions"]) for g in json.loads(i["group"])) for i in items]
    assert 3 <= len(items) <= 4 and sum(sizes) == 300 and max(sizes) - min(sizes) <= 40
    out = tokenize_shards(pa.Table.from_pylist(items[:2]), tiny_artifact, "text", "id", [], None)
    assert out.column("calibration").to_pylist() == [True] * (sizes[0] + sizes[1])
    want = [(k, int(r)) for k, rows in sorted(sample.items()) for r in rows][:sizes[0] + sizes[1]]
    assert list(zip(out.column("shard").to_pylist(), out.column("row").to_pylist())) == want
    assert out.column("id").to_pylist() == [f"r{100 * k + r}" for k, r in want]
    assert len(np.unique(out.column("id").to_pylist())) == len(want)
