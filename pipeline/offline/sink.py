"""Output: parquet parts named by shard and first row, written atomically, deterministic names.

`part-<shard>-<first row>.parquet` appears only once fully written: it is written under a temporary
name, then moved (a rename on a disk, a server-side copy on an object store: pipeline.data.storage), so
`--resume` never takes a half-written part for a finished one. A shard usually arrives whole (one part); when Ray Data cuts batches across shards it arrives in
pieces, each its own part. A retried batch rewrites the same name, and a rerun counts each shard's
rows in its parts to skip finished shards: every input row appears in the output exactly once.
"""
from __future__ import annotations

import json
import re

import pyarrow as pa

from pipeline.data import storage

PART = re.compile(r"(?:^|/)part-(\d{6})-(\d{6})\.parquet$")  # a whole name: `_tmp-...-part-...` is no part
PLAN = "_offramp_plan.json"
SUMMARY = "_offramp_summary.json"
STATS_KEY = b"offramp.part_stats"


def part_name(shard: int, first_row: int = 0) -> str:
    return f"part-{shard:06d}-{first_row:06d}.parquet"


def filesystem(url: str):
    """(fsspec filesystem, path) of an output URL."""
    return storage.filesystem(url)


def write_part(table: pa.Table, output_url: str, shard: int, first_row: int = 0, stats: dict | None = None) -> str:
    """Write a part atomically; `stats` (the part's audit counts) ride in its parquet metadata, so a resumed
    job's certificate can count the parts it did not write."""
    if stats is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), STATS_KEY: json.dumps(stats)})
    return write_table(output_url, part_name(shard, first_row), table)


def write_table(output_url: str, name: str, table: pa.Table) -> str:
    """`name` under the output, atomically: a temporary name, then a move."""
    import pyarrow.parquet as pq

    fs, root = filesystem(output_url)
    return storage.write_atomic(f"{root.rstrip('/')}/{name}", lambda f: pq.write_table(table, f), fs=fs)


def read_table(output_url: str, name: str) -> pa.Table | None:
    import pyarrow.parquet as pq

    fs, root = filesystem(output_url)
    path = f"{root.rstrip('/')}/{name}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def part_stats(output_url: str, shards: set[int]) -> list[dict]:
    """The audit counts stored in the parts of `shards` (parts written without them are left out)."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(output_url)
    out = []
    for shard, paths in list_parts(output_url).items():
        if shard in shards:
            for p in paths:
                with fs.open(p, "rb") as f:
                    meta = pq.ParquetFile(f).schema_arrow.metadata or {}
                if STATS_KEY in meta:
                    out.append(json.loads(meta[STATS_KEY]))
    return out


def list_parts(output_url: str) -> dict[int, list[str]]:
    """shard -> its part paths"""
    fs, root = filesystem(output_url)
    fs.invalidate_cache(root)  # workers in other processes wrote here since this process last listed it
    if not fs.exists(root):
        return {}
    parts: dict[int, list[str]] = {}
    for p in fs.ls(root, detail=False):
        if m := PART.search(p):
            parts.setdefault(int(m.group(1)), []).append(p)
    return parts


def finished_shards(output_url: str, shard_rows: dict[int, int]) -> set[int]:
    """Shards whose parts hold all their rows. Parts of unfinished shards are removed (redone whole), and so
    are parts that do not read as parquet (a store or tool that showed a half-written file under its name)."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(output_url)
    done = set()
    for shard, paths in list_parts(output_url).items():
        rows = 0
        for p in paths:
            try:
                with fs.open(p, "rb") as f:
                    pf = pq.ParquetFile(f)
                    stats = (pf.schema_arrow.metadata or {}).get(STATS_KEY)
                    # the input rows a part stands for (an output.filter writes fewer than that)
                    rows += json.loads(stats)["rows"] if stats else pf.metadata.num_rows
            except (OSError, ValueError, KeyError, pa.ArrowException):
                rows = None
                break
        if rows is not None and rows == shard_rows.get(shard):
            done.add(shard)
        else:
            for p in paths:
                fs.rm(p)
    return done


def clean_temporaries(output_url: str) -> int:
    """Remove what interrupted writers left (temporary names are never read as parts)."""
    fs, root = filesystem(output_url)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return 0
    tmps = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith(storage.TMP_PREFIX)]
    for p in tmps:
        fs.rm(p)
    return len(tmps)


def write_json(output_url: str, name: str, data: dict) -> None:
    fs, root = filesystem(output_url)
    storage.write_atomic(f"{root.rstrip('/')}/{name}", json.dumps(data, indent=2), fs=fs)


def read_json(output_url: str, name: str) -> dict | None:
    fs, root = filesystem(output_url)
    path = f"{root.rstrip('/')}/{name}"
    fs.invalidate_cache(root)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.loads(f.read())


def remove(output_url: str, name: str) -> None:
    """Remove `name` under the output, if it is there."""
    fs, root = filesystem(output_url)
    path = f"{root.rstrip('/')}/{name}"
    if fs.exists(path):
        fs.rm(path)
