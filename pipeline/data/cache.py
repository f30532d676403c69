"""Node-local copies of directories kept at URLs (model artifacts): fetched once per node and content.

    <cache>/<key>/           a finished, verified copy (it appears by one rename, never half-written)
    <cache>/<key>.lock       fcntl lock: concurrent actors on one node fetch once; the others wait, then use it
    <cache>/.tmp-<key>-...   a fetch in progress (removed by the next fetch when its writer died)

The key is a sha256 of the store's listing: every file's relative path, size and content tag (the ETag /
md5 an object store reports, else its modification time), so a changed artifact is fetched afresh and the
same content at two URLs is fetched once. A fetch checks each file's size and, where the store reports one,
its md5; every use re-checks the copy's sizes and sha256s against what the fetch recorded.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from pipeline.data import storage

__all__ = ["cache_root", "local_copy", "local_path"]

MARKER = storage.CACHE_MARKER
_CHUNK = 8 << 20
_TAGS = ("ETag", "etag", "md5Hash", "crc32c", "checksum")
_TIMES = ("LastModified", "mtime", "updated", "created")


def cache_root() -> Path:
    """The node's cache directory: `storage.cache_dir`, else $OFFRAMP_CACHE_DIR, else ~/.cache/offramp."""
    root = storage.settings().cache_dir or os.environ.get("OFFRAMP_CACHE_DIR") or "~/.cache/offramp"
    return Path(root).expanduser() / "artifacts"


def local_copy(url: str, what: str = "model") -> Path:
    """A local directory holding what is at `url`: the directory itself when it is on this disk, else this
    node's verified cached copy (fetched now if it has none)."""
    if storage.is_local(url):
        return Path(storage.filesystem(url)[1])
    fs, root = storage.check_readable(url, what)
    try:
        listing = _listing(fs, root)
    except Exception as e:  # noqa: BLE001
        raise storage.explain(url, e, what) from e
    if not listing:
        raise FileNotFoundError(f"{what} {url!r}: nothing is stored there; check the URL (upload the directory, "
                                "e.g. with `offramp bootstrap --out URL`)")
    key = hashlib.sha256(json.dumps(sorted(listing.items())).encode()).hexdigest()[:32]
    base = cache_root()
    final = base / key
    if _valid(final, listing):
        return final
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f"{key}.lock"):
        if _valid(final, listing):  # another actor on this node fetched it while we waited
            return final
        for old in base.glob(f".tmp-{key}-*"):  # fetches whose process died: nobody else writes under our lock
            shutil.rmtree(old, ignore_errors=True)
        if final.exists():  # a copy that failed its check: fetch again
            shutil.rmtree(final)
        tmp = base / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            digests = {rel: _fetch(fs, f"{root.rstrip('/')}/{rel}", tmp / rel, info, url) for rel, info in listing.items()}
            (tmp / MARKER).write_text(json.dumps({"url": url, "listing": listing, "sha256": digests}, indent=1))
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def local_path(path: str) -> str:
    """`path` unchanged when it is not a URL; a URL's local copy (local_copy) otherwise."""
    return str(local_copy(path)) if "://" in str(path) else str(path)


def _listing(fs, root: str) -> dict[str, list]:
    """relative path -> [size, content tag] of every file under `root` (objects being written are left out)."""
    fs.invalidate_cache(root)
    out = {}
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root.rstrip("/")):].lstrip("/")
        if info.get("type") != "file" or not rel or any(p.startswith(storage.TMP_PREFIX) for p in rel.split("/")):
            continue
        tag = next((str(info[k]) for k in _TAGS if info.get(k)), None)
        if tag is None:
            tag = next((str(info[k]) for k in _TIMES if info.get(k)), "")
        out[rel] = [int(info["size"]), tag]
    return out


def _fetch(fs, remote: str, local: Path, info: list, url: str) -> str:
    """Copy one file, checking its size and (when the store reports one) its md5; returns its sha256."""
    size, tag = info
    local.parent.mkdir(parents=True, exist_ok=True)
    sha, md5, n = hashlib.sha256(), hashlib.md5(), 0
    with fs.open(remote, "rb") as src, open(local, "wb") as dst:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
            sha.update(chunk)
            md5.update(chunk)
            n += len(chunk)
    if n != size:
        raise OSError(f"fetching {url!r}: {remote} has {n} bytes, the store listed {size}; try again")
    want = _md5_of(tag)
    if want is not None and want != md5.hexdigest():
        raise OSError(f"fetching {url!r}: {remote} does not match its md5 {want}; try again")
    return sha.hexdigest()


def _md5_of(tag: str) -> str | None:
    """The hex md5 a content tag states: a single-part S3 ETag, or GCS's base64 md5Hash; None otherwise."""
    t = tag.strip('"')
    if re.fullmatch(r"[0-9a-f]{32}", t):
        return t
    if re.fullmatch(r"[A-Za-z0-9+/]{22}==", t):
        return base64.b64decode(t).hex()
    return None


def _valid(final: Path, listing: dict) -> bool:
    """The copy exists, was fetched from this listing, and every file still has its recorded size and sha256."""
    marker = final / MARKER
    if not marker.exists():
        return False
    try:
        rec = json.loads(marker.read_text())
    except ValueError:
        return False
    if rec.get("listing") != json.loads(json.dumps(listing)):
        return False
    for rel, (size, _) in listing.items():
        p = final / rel
        if not p.is_file() or p.stat().st_size != size or _sha256(p) != rec["sha256"].get(rel):
            return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks until the fetching process releases it (or dies)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
