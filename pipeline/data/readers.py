"""Read parquet / jsonl / csv from any fsspec URL (local path, file://, memory://, s3://, gs://), opened through
pipeline.data.storage (the job's storage settings)."""
from __future__ import annotations

import posixpath

import pyarrow as pa

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def detect_format(path: str) -> str:
    for ext, fmt in FORMATS.items():
        if path.lower().endswith(ext) or path.lower().endswith(ext + ".gz"):
            return fmt
    raise ValueError(
        f"cannot tell the format of {path!r} from its name; use a .parquet, .jsonl or .csv file"
    )


def expand(url: str) -> tuple[object, list[str]]:
    """(filesystem, sorted data files) for a file, a directory or a glob. A store that cannot be reached (no
    credentials, no bucket, a package missing) fails here naming the URL and the fix (pipeline.data.storage)."""
    from pipeline.data import storage

    fs, path = storage.check_readable(url, "input")
    try:
        paths = fs.glob(path) if any(c in path for c in "*?[") else [path]
        files: list[str] = []
        for p in paths:
            if fs.isdir(p):
                files += [f for f in fs.find(p) if _is_data_file(f)]
            elif fs.exists(p):
                files.append(p)
    except Exception as e:  # noqa: BLE001
        raise storage.explain(url, e, "input") from e
    if not files:
        raise FileNotFoundError(f"no parquet/jsonl/csv input found at {url!r}; check the path or URL")
    return fs, sorted(files)


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    if name.startswith((".", "_")):
        return False
    try:
        detect_format(name)
    except ValueError:
        return False
    return True


def read_table(url: str) -> pa.Table:
    """The whole input as one Arrow table (for local tools; Ray jobs stream instead)."""
    fs, files = expand(url)
    tables = [_read_one(fs, f) for f in files]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as e:
        raise ValueError(f"the files under {url!r} do not share one schema: {e}") from e


def _read_one(fs, path: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fmt = detect_format(path)
    compression = "gzip" if path.endswith(".gz") else None
    try:
        with fs.open(path, "rb", compression=compression) as f:
            if fmt == "parquet":
                return pq.read_table(f)
            if fmt == "csv":
                return pacsv.read_csv(f)
            return pajson.read_json(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"cannot read {path!r} as {fmt}: {e}") from e


def require_columns(table: pa.Table, columns: list[str | None], source: str,
                    fix: str = "name the right one with --text-column / --label-column or the config's text_column"
                    ) -> None:
    """A ValueError naming the first missing column (unset names are skipped), the columns there are, and `fix`."""
    missing = [c for c in columns if c and c not in table.column_names]
    if missing:
        raise ValueError(f"{source!r} has no column {missing[0]!r} (columns: {table.column_names}); {fix}")
