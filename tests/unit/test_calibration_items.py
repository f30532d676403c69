"""The calibration sample's records as actors write them: whole only once every sampled row has landed, however
the rows were cut into batches (GPU actors batch by rows, so one shard's item can come in pieces)."""
import pyarrow as pa

from pipeline.offline.calibrate import whole_sample, write_item


def _piece(shard: int, rows: list[int]) -> pa.Table:
    return pa.table({"shard": pa.array([shard] * len(rows), pa.int64()), "row": pa.array(rows, pa.int64()),
                     "label_id": pa.array([r % 2 for r in rows], pa.int64())})


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


def test_a_sample_spread_over_many_shards_goes_to_the_actors_in_few_items_holding_every_row_once():
    import json

    from pipeline.offline.calibrate import calibration_items, sample_rows
    from pipeline.offline.shards import Shard

    shards = [Shard(k, f"in/f{k // 10}.parquet", (k % 10) * 1000, (k % 10 + 1) * 1000) for k in range(200)]
    sample = sample_rows(shards, 1499, seed=0)
    items = calibration_items(shards, sample, item_rows=512)
    assert len(sample) > 150 and len(items) == 3  # ~8 rows a shard, three items instead of ~190
    members = [m for it in items for m in json.loads(it["group"])]
    assert sum(len(m["positions"]) for m in members) == 1499
    assert sorted((m["shard"], p) for m in members for p in m["positions"]) == sorted(
        (k, int(p)) for k, v in sample.items() for p in v)
    assert all(it["shard"] == json.loads(it["group"])[0]["shard"] for it in items)
