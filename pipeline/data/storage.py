"""Object storage: the one place offramp opens a URL (model, corpus, output, controller checkpoint).

`filesystem(url)` is fsspec's filesystem for the URL's scheme with the options of the deployment's `storage:`
block (pipeline.config.StorageConfig) on top of what the scheme's library reads itself (s3fs: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ~/.aws, an instance role). Nothing here knows a scheme: the same calls serve a local path,
file://, memory://, s3:// and gs://.

The settings reach Ray workers as one environment variable (`ray_env_vars`), put on the job's runtime_env, so a
worker on any node opens the same URLs the driver checked. Object stores have no rename and no directories:
`write_atomic` writes under a temporary key and then moves it (a server-side copy on S3/GCS, a rename on a
disk), so a reader never sees a half-written object under its final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.config import StorageConfig

__all__ = ["ENV", "INSTALL", "StorageError", "check_readable", "check_writable", "configure", "explain",
           "filesystem", "is_local", "join", "makedirs", "protocol", "ray_env_vars", "settings",
           "staged_dir", "storage_options", "upload_dir", "write_atomic"]

ENV = "OFFRAMP_STORAGE"
"""The storage settings as JSON, for processes that did not parse the YAML (Ray workers)."""
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
"""Where the driver's store is, sent to the workers with the job. Credentials are not: they stay in the
environment or instance role of each node (or in the `storage:` block, if the user puts them there)."""
INSTALL = "pip install 'offramp[storage]'"
CACHE_MARKER = ".offramp-cache.json"
"""A node's record of a cached copy (pipeline.data.cache); it never travels with an upload."""
TMP_PREFIX = "_tmp-"
"""Objects being written; never read as data, removed by the next run over the same output."""

_S3 = ("s3", "s3a")
_GCS = ("gs", "gcs")
_configured: StorageConfig | None = None


class StorageError(ValueError):
    """A URL that cannot be used, with a message naming it and the fix."""


def configure(cfg: StorageConfig | dict | None) -> StorageConfig:
    """Use `cfg` for every URL this process opens (the driver calls it with the job's / app's block). An empty
    block (every field at its default) or None leaves the settings to the environment (ENV, else defaults)."""
    global _configured
    cfg = cfg if isinstance(cfg, StorageConfig) or cfg is None else StorageConfig.model_validate(cfg)
    _configured = None if cfg == StorageConfig() else cfg
    return settings()


def settings() -> StorageConfig:
    """This process's settings: configured here, else sent by the driver (ENV), else the defaults."""
    if _configured is not None:
        return _configured
    raw = os.environ.get(ENV)
    return StorageConfig.model_validate_json(raw) if raw else StorageConfig()


def protocol(url: str) -> str:
    import fsspec

    proto, _ = fsspec.core.split_protocol(str(url))
    return proto or "file"


def is_local(url: str) -> bool:
    """A path on this machine's disk (no fetching or uploading needed)."""
    return protocol(url) in ("file", "local")


def join(url: str, *names: str) -> str:
    return "/".join([str(url).rstrip("/"), *names])


def storage_options(url: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """The fsspec options for `url`: the typed settings of its scheme, then `options` by protocol and by URL
    prefix (longest last, so it wins)."""
    cfg = cfg or settings()
    proto = protocol(url)
    opts: dict[str, Any] = {}
    if proto in _S3:
        s3 = cfg.s3
        opts.update({k: v for k, v in {"endpoint_url": s3.endpoint_url, "key": s3.key, "secret": s3.secret,
                                       "profile": s3.profile}.items() if v is not None})
        if s3.anon:
            opts["anon"] = True
        if s3.region:
            opts["client_kwargs"] = {"region_name": s3.region}
    elif proto in _GCS:
        g = cfg.gcs
        opts.update({k: v for k, v in {"project": g.project, "token": g.token, "endpoint_url": g.endpoint_url}.items()
                     if v is not None})
    for key in sorted(cfg.options, key=len):
        if key == proto or (("://" in key) and str(url).startswith(key)):
            opts.update(cfg.options[key])
    return opts


def filesystem(url: str, cfg: StorageConfig | None = None):
    """(fsspec filesystem, path inside it) for `url`; a StorageError when its scheme cannot be opened here."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url), **storage_options(str(url), cfg))
    except Exception as e:  # noqa: BLE001 - unknown scheme, missing package, bad option: say which
        raise explain(url, e) from e


def makedirs(fs, path: str) -> None:
    """Make a directory where the filesystem has them. Object stores (paths start with a bucket) have none,
    and s3fs's makedirs would create a missing bucket: a typo in a bucket name must fail, not make one."""
    if _bucket(path) is None:
        fs.makedirs(path, exist_ok=True)


def _bucket(path: str) -> str | None:
    """The bucket (container) a store path starts with; None for rooted paths (disks, memory://)."""
    return None if path.startswith("/") or not path else path.split("/", 1)[0]


def write_atomic(url: str, write: Callable[[Any], None] | bytes | str, fs=None) -> str:
    """Write the object at `url` so that it appears whole or not at all: `write(file)` (or the bytes / text)
    goes to a temporary name beside it, which is then moved to `url`. Returns the final path."""
    if fs is None:
        fs, path = filesystem(url)
    else:
        path = str(url)
    parent, name = posixpath.split(path.rstrip("/"))
    makedirs(fs, parent)
    tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
    try:
        with fs.open(tmp, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write.encode() if isinstance(write, str) else write)
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # noqa: BLE001 - the next run's clean-up removes it; the original error matters
            pass
        raise
    return path


def upload_dir(local: str | Path, url: str, last: tuple[str, ...] = ("manifest.json",)) -> None:
    """Copy a local directory to `url`, the files named in `last` after all others: a reader that finds
    an artifact's manifest.json finds the rest of it in place."""
    fs, root = check_writable(url, "output")
    local = Path(local)
    files = sorted((p for p in local.rglob("*") if p.is_file() and p.name != CACHE_MARKER),
                   key=lambda p: (p.name in last, str(p)))
    for p in files:
        rel = p.relative_to(local).as_posix()
        with open(p, "rb") as src:
            write_atomic(join(root, rel), lambda f, src=src: _copy(src, f), fs=fs)


def _copy(src, dst, chunk: int = 8 << 20) -> None:
    while data := src.read(chunk):
        dst.write(data)


@contextlib.contextmanager
def staged_dir(url: str) -> Iterator[str]:
    """A local path to write what belongs at `url` (`--out` of the model commands): `url` itself when it is
    on this disk; else a path in a temporary directory, uploaded to `url` (upload_dir) once the block succeeds."""
    if is_local(url):
        yield filesystem(url)[1]
        return
    check_writable(url, "--out")  # fail before the work, not after it
    with tempfile.TemporaryDirectory(prefix="offramp-upload-") as tmp:
        out = os.path.join(tmp, "out")  # not made yet: as for a local --out that does not exist
        yield out
        if not os.path.isdir(out):
            raise StorageError(f"--out {url!r}: the command wrote nothing to upload")
        upload_dir(out, url)


def check_readable(url: str, what: str = "input") -> tuple[Any, str]:
    """(fs, path) after a first request to the store (its bucket, or the path's root): a missing package,
    unknown scheme, unreachable endpoint, missing credentials or bucket fails here, naming `url` and the fix."""
    fs, path = filesystem(url)
    probe = _bucket(path)
    if probe is not None:
        try:
            fs.info(probe)
        except FileNotFoundError as e:
            raise _no_bucket(url, what) from e
        except Exception as e:  # noqa: BLE001
            raise explain(url, e, what) from e
    return fs, path


def _no_bucket(url: str, what: str) -> StorageError:
    bucket = _bucket(filesystem(url)[1])
    return StorageError(f"{what} {url!r}: bucket {bucket!r} does not exist; create it first (for example "
                        f"`aws s3 mb {protocol(url)}://{bucket}`, or `mc mb` on MinIO) or fix the URL")


def check_writable(url: str, what: str = "output") -> tuple[Any, str]:
    """check_readable, then write and delete a small object under `url` (permission to write)."""
    fs, path = check_readable(url, what)
    probe = join(path, f"{TMP_PREFIX}probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(fs, path)
        write_atomic(probe, b"offramp", fs=fs)
        fs.rm(probe)
    except Exception as e:  # noqa: BLE001
        raise explain(url, e, what) from e
    return fs, path


def explain(url: str, exc: BaseException, what: str = "URL") -> StorageError:
    """`exc` from opening `url` as a StorageError that names the URL and what to do."""
    if isinstance(exc, StorageError):
        return exc
    proto = protocol(url)
    name, text = type(exc).__name__, str(exc)
    env = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)" if proto in _S3 else "the store's credentials"
    if proto in _GCS:
        env = "GOOGLE_APPLICATION_CREDENTIALS"
    if isinstance(exc, ImportError):
        return StorageError(f"{what} {url!r}: {proto}:// URLs need a package that is not installed ({text}); "
                            f"{INSTALL}")
    if isinstance(exc, ValueError) and "Protocol not known" in text:
        return StorageError(f"{what} {url!r}: unknown URL scheme {proto!r}; use a local path, file://, s3://, gs:// "
                            f"or another fsspec protocol whose package is installed")
    if "Credentials" in name or ("credentials" in text.lower() and "unable" in text.lower()):
        return StorageError(f"{what} {url!r}: no credentials for {proto}:// ({text}); set {env} in the environment "
                            f"of the driver and every node, or `storage.{'s3' if proto in _S3 else 'gcs'}` in the YAML")
    if isinstance(exc, PermissionError) or any(s in text for s in ("AccessDenied", "Forbidden", "InvalidAccessKeyId",
                                                                    "SignatureDoesNotMatch", "403")):
        return StorageError(f"{what} {url!r}: access denied ({text}); check the credentials ({env}) and that they "
                            "may read and write there")
    if "Connect" in name or "connect" in text.lower() or "EndpointConnectionError" in name:
        where = (settings().s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")) if proto in _S3 else None
        return StorageError(f"{what} {url!r}: cannot reach the storage endpoint{f' {where}' if where else ''} "
                            f"({text}); check storage.{'s3' if proto in _S3 else proto}.endpoint_url (or "
                            "AWS_ENDPOINT_URL) and that the server is up")
    if isinstance(exc, FileNotFoundError):
        if "bucket" in text.lower():
            return _no_bucket(url, what)
        return StorageError(f"{what} {url!r} does not exist ({text})")
    return StorageError(f"{what} {url!r}: {name}: {text}")


def ray_env_vars(cfg: StorageConfig | None = None) -> dict[str, str]:
    """Environment variables that give a Ray worker this driver's storage settings (for a runtime_env):
    the `storage:` block as JSON when it is set, and where the store is (FORWARDED_ENV). Variables that a
    submitted Ray job already carries are left out (Ray refuses to merge a variable set twice)."""
    cfg = cfg or settings()
    out = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if cfg != StorageConfig():
        out[ENV] = cfg.model_dump_json(exclude_defaults=True)
    carried = _submitted_env_vars()
    return {k: v for k, v in out.items() if k not in carried}


def missing_in_ray(runtime_env: dict | None, cfg: StorageConfig | None = None) -> bool:
    """True when a Ray started without offramp lacks this process's `storage:` block (its workers would open
    URLs without it)."""
    cfg = cfg or settings()
    if cfg == StorageConfig():
        return False
    env_vars = (runtime_env or {}).get("env_vars") or {}
    return ENV not in env_vars and ENV not in _submitted_env_vars()


def _submitted_env_vars() -> dict[str, str]:
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}
