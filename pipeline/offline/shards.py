"""Shards: the unit of offline work, output and resume.

A shard is a row range of one input file. Planning reads only metadata for parquet (row counts);
jsonl/csv files are read once to count rows. Given the job's text column, JSONL is read tolerantly
(pipeline.data.readers.read_jsonl: a bad line is a row with an error), in planning and reading alike, so
the rows planned are the rows read. Small inputs are cut into at least `min_shards`
shards so every actor gets work (the new parquet reader makes one block of small files).
"""
from __future__ import annotations

import math
import posixpath
from dataclasses import asdict, dataclass

import pyarrow as pa

from pipeline.data import storage
from pipeline.data.readers import _read_one, detect_format, expand


@dataclass(frozen=True)
class Shard:
    shard: int
    path: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return asdict(self)


def _count_rows(fs, path: str, text_column: str | None = None) -> int:
    if detect_format(path) == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    return _read_one(fs, path, text_column).num_rows


def plan_shards(url: str, rows_per_shard: int, min_shards: int = 1, text_column: str | None = None) -> list[Shard]:
    """The input's shards, in input order (paths protocol-qualified for reading them back anywhere).
    `text_column`: JSONL read tolerantly (read_shard must be given the same); None: strictly, so a file
    with a bad line fails here."""
    fs, files = expand(url)
    counts = [_count_rows(fs, f, text_column) for f in files]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"input {url!r} has no rows")
    size = max(1, min(rows_per_shard, math.ceil(total / max(1, min_shards))))
    shards: list[Shard] = []
    for path, n in zip(files, counts):
        for start in range(0, n, size):
            shards.append(Shard(len(shards), fs.unstrip_protocol(path), start, min(n, start + size)))
    return shards


def read_shard(shard: Shard, text_column: str | None = None) -> pa.Table:
    """The shard's rows (whole parquet row groups are read, then sliced). `text_column`: JSONL read
    tolerantly, with the planning's rows (row_errors gives each row's reading error)."""
    fs, path = storage.filesystem(shard.path)
    if detect_format(path) == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            groups, first, offset = [], None, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset + n > shard.start and offset < shard.stop:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            table = pf.read_row_groups(groups)
        return table.slice(shard.start - first, shard.rows)
    return _read_one(fs, path, text_column).slice(shard.start, shard.rows)


def row_ids(table: pa.Table, shard: Shard, id_column: str | None, rows=None) -> list:
    """Each row's id: the id column as strings, or stable `<file name>:<row number>` (the same on every run).
    `rows`: positions within the shard (default: all of it, in order)."""
    positions = range(table.num_rows) if rows is None else rows
    if id_column:
        col = table.column(id_column)
        return [None if (v := col[int(i)].as_py()) is None else str(v) for i in positions]
    base = posixpath.basename(shard.path)
    return [f"{base}:{shard.start + int(i)}" for i in positions]
