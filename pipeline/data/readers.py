"""Read parquet / jsonl / csv from any fsspec URL (local path, file://, memory://, s3://, gs://), opened through
pipeline.data.storage (the job's storage settings)."""
from __future__ import annotations

import json
import posixpath

import pyarrow as pa

from pipeline.data.texts import validate_text

ROW_ERROR = "_offramp_row_error"
"""The column a tolerant JSONL read adds when some lines are not rows (`line N: ...`; null for good rows)."""


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


def _read_one(fs, path: str, text_column: str | None = None) -> pa.Table:
    """One file as a table. `text_column` set: a JSONL file is read tolerantly (`read_jsonl`), so one bad line
    costs one row, not the file; None: strictly (a line pyarrow cannot read fails the whole file)."""
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
            if text_column is not None:
                return read_jsonl(f, text_column)
            return pajson.read_json(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"cannot read {path!r} as {fmt}: {e}") from e


def read_jsonl(f, text_column: str) -> pa.Table:
    """A JSONL file (a binary file object) -> one row per non-blank line (blank lines are skipped, as pyarrow
    does), never failing on a bad line: a line that is not JSON, not a JSON object, has no `text_column` or a text
    that is neither a string nor null becomes a row whose ROW_ERROR names its physical line (from 1) and what was
    wrong (`line 3: not valid JSON (...)`); a line that is no JSON object has nulls in every column, a record keeps
    its other columns and gets a null text. A null text is a row like any other (validate_text reports it).

    Fast path: pyarrow's reader, when it reads the file with one row per line; nulls in the text column are then
    looked up line by line (no field, or null?). Otherwise every line is parsed with `json` and the records go back
    through pyarrow (the fast path's types; a column it cannot type as one keeps strings, JSON-encoded where they
    were not). No record with the text field: no text column (the caller's column check names it). Raises
    ArrowInvalid when no line is a JSON object."""
    import pyarrow.json as pajson

    tee = _Tee(f)  # pyarrow streams the file (decompressing as it parses); the bytes stay for a second look
    try:
        table = pajson.read_json(pa.PythonFile(tee, mode="r"))
        table.validate(full=True)  # pyarrow's reader lets bytes that are not UTF-8 through
    except pa.ArrowInvalid:
        table = None
    tee.read()  # to the end: pyarrow stops at an error
    if table is not None:
        # one row per line: the file's line count (cheap), else its non-blank lines (blank lines skipped)
        rows_are_lines = table.num_rows == tee.lines()
        lines = None
        if not rows_are_lines:
            lines = _lines(tee.data())
            rows_are_lines = table.num_rows == len(lines)
        if rows_are_lines:
            if text_column not in table.column_names or table.column(text_column).null_count == 0:
                return table
            lines = lines if lines is not None else _lines(tee.data())
            try:
                nulls = table.column(text_column).is_null().to_pylist()
                errors = [None if not null or text_column in json.loads(lines[i][1]) else
                          f"line {lines[i][0]}: no {text_column!r} field" for i, null in enumerate(nulls)]
                return _with_errors(table, errors)
            except ValueError:  # a line pyarrow read and json does not: the slow path says which
                pass
    return _read_lines(_lines(tee.data().removeprefix(b"\xef\xbb\xbf")), text_column)


class _Tee:
    """A read-only file that keeps what was read from `f`."""

    closed = False

    def __init__(self, f):
        self.f, self.chunks, self.position, self.last = f, [], 0, b"\n"

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        if chunk:
            self.chunks.append(chunk)
            self.position += len(chunk)
            self.last = chunk[-1:]
        return chunk

    def tell(self) -> int:
        return self.position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def lines(self) -> int:
        """Lines read, blank ones included."""
        return sum(c.count(b"\n") for c in self.chunks) + (self.last != b"\n")

    def data(self) -> bytes:
        return b"".join(self.chunks)


def _lines(data: bytes) -> list[tuple[int, bytes]]:
    """(physical line number from 1, line) for each non-blank line."""
    return [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]


def _read_lines(lines: list[tuple[int, bytes]], text_column: str) -> pa.Table:
    """The slow path: each line parsed on its own (read_jsonl)."""
    if not lines:
        return pa.table({})
    errors: list[str | None] = []
    at: list[int | None] = []  # row -> its record among the JSON objects, None: not an object
    records: list[bytes] = []
    for n, line in lines:
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            errors.append(f"line {n}: not valid JSON (not UTF-8: byte {line[e.start]:#04x} at column {e.start + 1})")
            at.append(None)
            continue
        except json.JSONDecodeError as e:
            errors.append(f"line {n}: not valid JSON ({e.msg}: column {e.colno})")
            at.append(None)
            continue
        if not isinstance(value, dict):
            errors.append(f"line {n}: not a JSON object but {_JSON_TYPES[type(value)]}")
            at.append(None)
            continue
        error = None
        if text_column not in value:
            error = f"line {n}: no {text_column!r} field"
        elif value[text_column] is not None and not isinstance(value[text_column], str):
            error = f"line {n}: {validate_text(value[text_column])}"
            line = json.dumps({**value, text_column: None}).encode()  # its other columns stay
        errors.append(error)
        at.append(len(records))
        records.append(line)
    if not records:
        raise pa.ArrowInvalid(f"none of its {len(lines)} lines is a JSON object"
                              + (f" ({errors[0]})" if errors else ""))
    table = _records_table(records)
    if not table.num_columns:  # every record `{}` (no text field: every row has an error)
        return pa.table({ROW_ERROR: pa.array(errors, pa.string())})
    if len(records) < len(at):  # lines that are no object: a null index gives a row of nulls
        table = table.take(pa.array(at, pa.int64()))
    return _with_errors(table, errors)


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


def _records_table(records: list[bytes]) -> pa.Table:
    """JSON object lines as a table: pyarrow's types, or (a column it cannot type as one) Python's."""
    import pyarrow.json as pajson

    try:
        table = pajson.read_json(pa.BufferReader(b"\n".join(records)))
        if table.num_rows == len(records):
            return table
    except pa.ArrowInvalid:
        pass
    values = [json.loads(r) for r in records]
    names = list(dict.fromkeys(k for v in values for k in v))
    columns = {}
    for name in names:
        col = [v.get(name) for v in values]
        try:
            columns[name] = pa.array(col)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            columns[name] = pa.array([x if x is None or isinstance(x, str) else json.dumps(x) for x in col],
                                     pa.string())
    return pa.table(columns)


def _with_errors(table: pa.Table, errors: list[str | None]) -> pa.Table:
    if not any(errors):
        return table
    return table.append_column(ROW_ERROR, pa.array(errors, pa.string()))


def row_errors(table: pa.Table) -> list[str | None]:
    """Each row's reading error (read_jsonl), None for a good row."""
    if ROW_ERROR not in table.column_names:
        return [None] * table.num_rows
    return table.column(ROW_ERROR).to_pylist()


def require_columns(table: pa.Table, columns: list[str | None], source: str,
                    fix: str = "name the right one with --text-column / --label-column or the config's text_column"
                    ) -> None:
    """A ValueError naming the first missing column (unset names are skipped), the columns there are, and `fix`."""
    missing = [c for c in columns if c and c not in table.column_names]
    if missing:
        names = [c for c in table.column_names if c != ROW_ERROR]
        raise ValueError(f"{source!r} has no column {missing[0]!r} (columns: {names}); {fix}")
