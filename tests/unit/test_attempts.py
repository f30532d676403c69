"""Shard attempts: counted per shard piece, on any fsspec output (a local dir and memory://)."""
import uuid

import pytest

from pipeline.offline import attempts


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_pieces_attempted_more_than_once_are_counted_and_cleared(tmp_path, scheme):
    out = str(tmp_path / "out") if scheme == "local" else f"memory://attempts-{uuid.uuid4().hex}/out"
    assert attempts.retried(out) == {}
    for shard, first in [(0, 0), (1, 0), (1, 0), (2, 50), (2, 50), (2, 50), (2, 0)]:
        attempts.mark(out, shard, first)
    assert attempts.retried(out) == {"000001-000000": 2, "000002-000050": 3}
    attempts.clear(out)
    assert attempts.retried(out) == {}
