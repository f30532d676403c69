"""Shards: the unit of offline work, output and resume.

A shard is a row range of one input file. Planning reads only metadata for parquet (row counts);
jsonl/csv files are read once to count rows. Small inputs are cut into at least `min_shards`
shards so every actor gets work (the new parquet reader makes one block of small files).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pyarrow as pa

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


def _count_rows(fs, path: str) -> int:
    if detect_format(path) == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    return _read_one(fs, path).num_rows


def plan_shards(url: str, rows_per_shard: int, min_shards: int = 1) -> tuple[list[Shard], str]:
    """(shards in input order, protocol-qualified base for reading them back)."""
    fs, files = expand(url)
    counts = [_count_rows(fs, f) for f in files]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"input {url!r} has no rows")
    size = max(1, min(rows_per_shard, math.ceil(total / max(1, min_shards))))
    shards: list[Shard] = []
    for path, n in zip(files, counts):
        for start in range(0, n, size):
            shards.append(Shard(len(shards), fs.unstrip_protocol(path), start, min(n, start + size)))
    return shards, url


def read_shard(shard: Shard) -> pa.Table:
    """The shard's rows (whole parquet row groups are read, then sliced)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(shard.path)
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
    return _read_one(fs, path).slice(shard.start, shard.rows)
