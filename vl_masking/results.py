"""Writers: the result table plus its metadata as Parquet, CSV (+ NAME.meta.json) and JSON.

Every file is written under a temporary name in the output directory and renamed
into place only after all requested files are complete, with Ctrl-C and SIGTERM held
back during the renames: all formats are committed, or none. An interrupted or failed
run never leaves a truncated file under a final name; temporary files left by a killed
process (their names carry its host and process id) are removed by the next write there.

JSON layout: pandas' "table" orient ({"schema", "data": [records]}) with an extra
"metadata" key, so `pd.read_json(path, orient="table")` reads it directly.

Values that are not finite (a float16 run that overflows) are kept in every format:
Parquet stores NaN and +-inf as floats; CSV spells them `nan`, `inf`, `-inf`; JSON, which
has no such literals, writes NaN as `null` and +-inf as `1e999` / `-1e999` (numbers too
large for a double, which JSON.parse, Python's json and pandas read back as +-Infinity).
The metadata's `column_types` lets a CSV be read back with its numeric columns numeric.

A run owns its name: the files of NAME in formats this run does not write (left by an
earlier run with more --formats) are removed together with the renames.

CSV and JSON text is produced by Arrow's vectorised casts (floats in their shortest
round-trip form, which reads back as the same float32) in blocks of rows, never row
by row in Python: a full 4B run has millions of rows.
"""

import errno
import json
import os
import re
import signal
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from .errors import OutputError
from .options import FORMATS, output_paths

METADATA_KEY = b"mask_impact"
HELD = (signal.SIGINT, signal.SIGTERM)  # the signals a write holds back
TEXT_BLOCK_ROWS = 1 << 19  # rows per block of CSV / JSON text: bounds memory, keeps 32-bit string offsets


def _owner() -> str:
    return f"{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())}-{os.getpid()}"


def temporary_beside(final: Path) -> str:
    """An empty temporary file in `final`'s directory (so renaming it onto `final` is atomic)."""
    fd, temp = tempfile.mkstemp(prefix=f".{final.name}.{_owner()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
    return temp


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of this tool in `directory` left by a process of this host that no longer runs
    (killed in the middle of a write). Those of live processes (another shard writing) stay."""
    host = _owner().rsplit("-", 1)[0]
    pattern = re.compile(rf"\..+\.{re.escape(host)}-(\d+)\.[A-Za-z0-9_]+\.tmp")
    for path in Path(directory).glob(f".*.{host}-*.tmp"):
        m = pattern.fullmatch(path.name)
        if m and not _alive(int(m.group(1))):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block is done (they are acted on right after it).

    The signals are caught by a Python handler that only records them, not blocked with a signal mask: a
    process-directed signal goes to any thread that does not block it (torch's worker threads), and Python
    then runs its handler in the main thread at once, mask or not."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in HELD}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


@contextmanager
def signals_ignored():
    """Ctrl-C and SIGTERM are dropped until the block is done: the write of what an interrupted run finished
    (a second Ctrl-C means "stop", and stopping is what the block does)."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread receives them
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in HELD}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def write_text_atomically(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    remove_stale_temporaries(path.parent)
    temp = temporary_beside(path)
    try:
        Path(temp).write_bytes(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_results(table: pd.DataFrame, metadata: dict, output_dir, name, formats, on_commit=None) -> dict:
    """Write the requested formats of one table atomically; returns {format: final path}."""
    return write_result_sets([(table, metadata, name)], output_dir, formats, on_commit)[0]


def write_result_sets(sets: list, output_dir, formats, on_commit=None) -> list:
    """Write [(table, metadata, name)] (the measures of one run) in the requested formats: every file of every
    set is written under a temporary name first, then all are renamed into place in one block with Ctrl-C and
    SIGTERM held, so a signal never leaves one measure's new files beside another's old ones. on_commit(paths)
    is called inside that block, so that a signal delivered right after it knows the files are complete.
    Returns one {format: final path} per set.

    The table bodies are written first; the metadata (which records write_s, the time of the whole write) is
    attached last: the Parquet footer and the tail of the JSON file.
    """
    output_dir = Path(output_dir)
    staged = []  # [(temps {format: temporary}, paths {format: final}, others [files of the name to remove])]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output_dir)
        for table, metadata, name in sets:
            paths = output_paths(output_dir, name, formats)
            for final in paths.values():
                if final.is_dir():
                    raise OutputError(f"cannot write {final}: a directory of that name exists")
            others = [p for p in output_paths(output_dir, name, FORMATS).values() if p not in paths.values()]
            temps = {}
            staged.append((temps, paths, others))
            _write_temporaries(table, metadata, paths, temps)
        with signals_held():
            for temps, paths, others in staged:
                for fmt, temp in list(temps.items()):
                    os.replace(temp, paths[fmt])
                    del temps[fmt]
                for stale in others:  # an earlier run's files of this name: not part of this result set
                    stale.unlink(missing_ok=True)
            written = [{fmt: str(p) for fmt, p in paths.items()} for _, paths, _ in staged]
            if on_commit is not None:
                on_commit(written)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
        raise OutputError(f"cannot write the result files in {output_dir}: {reason}{hint}") from None
    finally:
        for temps, _, _ in staged:
            for temp in temps.values():
                try:
                    os.unlink(temp)
                except FileNotFoundError:
                    pass
    return written


def _write_temporaries(table: pd.DataFrame, metadata: dict, paths: dict, temps: dict) -> None:
    """Each format of one table into a temporary file beside its final path (recorded in temps as it is made)."""
    started = time.perf_counter()
    parquet_writer = json_file = None
    try:
        for fmt, final in paths.items():
            temps[fmt] = temporary_beside(final)
        arrow = to_arrow(table)
        metadata["column_types"] = {f.name: str(f.type) for f in arrow.schema}
        if "parquet" in temps:
            # Without a stored Arrow schema, pyarrow shows the file's key-value metadata (ours, added
            # at the end) as the schema metadata: pq.read_schema(path).metadata[b"mask_impact"].
            parquet_writer = pq.ParquetWriter(temps["parquet"], arrow.schema, compression="snappy",
                                              store_schema=False)
            parquet_writer.write_table(arrow)
        if "csv" in temps:
            _write_csv(arrow, temps["csv"])
        if "json" in temps:
            json_file = open(temps["json"], "wb")
            _write_json_body(table, arrow, json_file)
        metadata.setdefault("timings", {})["write_s"] = round(time.perf_counter() - started, 4)
        encoded = json.dumps(metadata, ensure_ascii=False)
        if parquet_writer is not None:
            parquet_writer.add_key_value_metadata({METADATA_KEY: encoded.encode()})
            parquet_writer.close()
            parquet_writer = None
        if json_file is not None:
            json_file.write(f', "metadata": {encoded}}}'.encode())
            json_file.close()
            json_file = None
        if "meta" in temps:
            Path(temps["meta"]).write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
    finally:
        for handle in (parquet_writer, json_file):
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass  # already failing; the temporary file goes next


def to_arrow(table: pd.DataFrame) -> pa.Table:
    """The table as Arrow, float columns as they are: from_pandas alone would store NaN as null (missing)."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    for i, f in enumerate(arrow.schema):
        if pa.types.is_floating(f.type):
            arrow = arrow.set_column(i, f, pa.array(table[f.name].to_numpy(), type=f.type, from_pandas=False))
    return arrow


def _write_csv(arrow: pa.Table, path) -> None:
    """Arrow's CSV writer: strings quoted, floats in shortest round-trip form (nan / inf spelled out)."""
    pcsv.write_csv(arrow, path, pcsv.WriteOptions(batch_size=TEXT_BLOCK_ROWS))


def _json_values(column: pa.ChunkedArray) -> pa.Array:
    """Each value as a JSON literal: strings encoded once per distinct value, then looked up."""
    column = column.combine_chunks()
    if pa.types.is_dictionary(column.type) or pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        encoded = column if pa.types.is_dictionary(column.type) else column.dictionary_encode()
        literals = pa.array([json.dumps(v, ensure_ascii=False) for v in encoded.dictionary.to_pylist()], pa.string())
        return pc.take(literals, encoded.indices)
    text = pc.cast(column, pa.string())
    if pa.types.is_floating(column.type):  # JSON has no nan / inf literals
        text = pc.if_else(pc.is_nan(column), "null", text)
        text = pc.if_else(pc.is_inf(column), pc.if_else(pc.greater(column, 0), "1e999", "-1e999"), text)
    return pc.fill_null(text, "null")  # a missing value of any type; a null would drop its whole record


def _write_json_body(table: pd.DataFrame, arrow: pa.Table, out) -> None:
    """`{"schema": ..., "data": [records]` (no closing brace: the metadata follows)."""
    head = table.head(0).astype({c: str for c in table.columns if isinstance(table[c].dtype, pd.CategoricalDtype)})
    schema = pd.io.json.build_table_schema(head, index=False)
    out.write(('{"schema": ' + json.dumps(schema) + ', "data": [').encode())
    values = [_json_values(arrow[name]) for name in arrow.column_names]
    keys = [pa.scalar(("{" if i == 0 else ",") + json.dumps(name) + ":") for i, name in enumerate(arrow.column_names)]
    rows = arrow.num_rows
    for start in range(0, rows, TEXT_BLOCK_ROWS):
        # Record = '{"name":' v0 ',"name":' v1 ... '},' joined element-wise over a block of rows.
        args = []
        for key, column in zip(keys, values):
            args += [key, column.slice(start, TEXT_BLOCK_ROWS)]
        records = pc.binary_join_element_wise(*args, pa.scalar("},"), "")
        # The records' bytes lie back to back in the array's data buffer: write them as one block.
        offsets = np.frombuffer(records.buffers()[1], dtype=np.int32)
        first, last = int(offsets[records.offset]), int(offsets[records.offset + len(records)])
        data = memoryview(records.buffers()[2])[first:last]
        out.write(data[:-1] if start + TEXT_BLOCK_ROWS >= rows else data)  # no comma after the last
    out.write(b"]")


class NoMetadata(ValueError):
    """A table file without the run's metadata (a copy re-saved by pandas or another tool drops it)."""


def read_metadata(path) -> dict:
    """Metadata of any of the three formats."""
    path = Path(path)
    if path.suffix == ".parquet":
        stored = pq.read_schema(path).metadata or {}
        if METADATA_KEY not in stored:
            raise NoMetadata("the file holds no mask-impact metadata (a copy re-saved by pandas or another tool "
                             "drops it): use the file the tool wrote")
        return json.loads(stored[METADATA_KEY])
    if path.suffix == ".json" and not path.name.endswith(".meta.json"):
        return json.loads(path.read_text(encoding="utf-8"))["metadata"]
    meta = path.with_name(path.name[: -len(path.suffix)] + ".meta.json") if path.suffix == ".csv" else path
    return json.loads(meta.read_text(encoding="utf-8"))


def read_table(path) -> pd.DataFrame:
    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".json":
        return pd.read_json(path, orient="table")
    # Token texts such as "nan" or "NA" stay text; only the numeric columns (from the metadata) read nan.
    try:
        types = read_metadata(path).get("column_types") or {}
    except (OSError, ValueError):
        types = {}
    numeric = [c for c, t in types.items() if t in ("halffloat", "float", "double")]
    return pd.read_csv(path, keep_default_na=False, na_values={c: ["nan", "NaN", ""] for c in numeric})
