"""Output: one parquet part per shard, written atomically, with deterministic names.

`part-<shard>.parquet` appears only when the whole shard is written (write to a temp name, then
rename), so a rerun can skip finished shards and a retried shard overwrites its own part: every
input row appears in the output exactly once.
"""
from __future__ import annotations

import json
import re
import uuid

import pyarrow as pa

PART = re.compile(r"part-(\d{6})\.parquet$")
PLAN = "_offramp_plan.json"
SUMMARY = "_offramp_summary.json"


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def write_part(table: pa.Table, output_url: str, shard: int) -> str:
    import pyarrow.parquet as pq

    fs, root = _fs(output_url)
    fs.makedirs(root, exist_ok=True)
    final = f"{root.rstrip('/')}/{part_name(shard)}"
    tmp = f"{root.rstrip('/')}/_tmp-{shard:06d}-{uuid.uuid4().hex[:8]}.parquet"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, final)
    return final


def finished_shards(output_url: str) -> set[int]:
    fs, root = _fs(output_url)
    if not fs.exists(root):
        return set()
    return {int(m.group(1)) for p in fs.ls(root, detail=False) if (m := PART.search(p))}


def clean_temporaries(output_url: str) -> int:
    fs, root = _fs(output_url)
    if not fs.exists(root):
        return 0
    tmps = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("_tmp-")]
    for p in tmps:
        fs.rm(p)
    return len(tmps)


def write_json(output_url: str, name: str, data: dict) -> None:
    fs, root = _fs(output_url)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{name}", "w") as f:
        f.write(json.dumps(data, indent=2))


def read_json(output_url: str, name: str) -> dict | None:
    fs, root = _fs(output_url)
    path = f"{root.rstrip('/')}/{name}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.loads(f.read())
