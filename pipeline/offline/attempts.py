"""Which shards ran more than once in a job (an actor or a whole node lost mid-shard, its batch retried
elsewhere): each attempt leaves an empty marker `_offramp_attempts/<shard>-<first row>-<attempt id>` under the
output. Parts are atomic with deterministic names, so a retry never duplicates rows; this only counts them."""
from __future__ import annotations

import uuid
from collections import Counter

from pipeline.offline import sink

DIR = "_offramp_attempts"


def mark(output_url: str, shard: int, first_row: int) -> None:
    fs, root = sink.filesystem(output_url)
    fs.makedirs(f"{root}/{DIR}", exist_ok=True)
    fs.pipe_file(f"{root}/{DIR}/{shard:06d}-{first_row:06d}-{uuid.uuid4().hex[:12]}", b"")


def retried(output_url: str) -> dict[str, int]:
    """`"<shard>-<first row>"` -> attempts, for the shard pieces attempted more than once."""
    fs, root = sink.filesystem(output_url)
    fs.invalidate_cache(f"{root}/{DIR}")
    if not fs.exists(f"{root}/{DIR}"):
        return {}
    counts = Counter(p.rsplit("/", 1)[-1].rsplit("-", 1)[0] for p in fs.ls(f"{root}/{DIR}", detail=False))
    return {k: n for k, n in sorted(counts.items()) if n > 1}


def clear(output_url: str) -> None:
    """Forget earlier runs' attempts (a resumed job counts its own)."""
    fs, root = sink.filesystem(output_url)
    if fs.exists(f"{root}/{DIR}"):
        fs.rm(f"{root}/{DIR}", recursive=True)
