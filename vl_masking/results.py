"""Writers: the result table plus its metadata as Parquet, CSV (+ NAME.meta.json) and JSON.

Every file is written under a temporary name in the output directory and renamed
into place only after all requested files are complete, so an interrupted or failed
run never leaves a truncated file under a final name.

JSON layout: pandas' "table" orient ({"schema", "data": [records]}) with an extra
"metadata" key, so `pd.read_json(path, orient="table")` reads it directly.
"""

import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"mask_impact"


def output_paths(output_dir, name, formats) -> dict:
    base = Path(output_dir) / name
    paths = {}
    for fmt in formats:
        paths[fmt] = base.with_name(f"{name}.{fmt}")
        if fmt == "csv":
            paths["meta"] = base.with_name(f"{name}.meta.json")
    return paths


def write_results(table: pd.DataFrame, metadata: dict, output_dir, name, formats) -> dict:
    """Write the requested formats atomically; returns {format: final path}.

    The table bodies are written first; the metadata (which records write_s, the time of
    the whole write) is attached last: the Parquet footer and the tail of the JSON file.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(output_dir, name, formats)
    temps = {}
    parquet_writer = json_file = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        for fmt, final in paths.items():
            fd, temps[fmt] = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=output_dir)
            os.close(fd)
            os.chmod(temps[fmt], 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
        if "parquet" in temps:
            arrow = pa.Table.from_pandas(table, preserve_index=False)
            # Without a stored Arrow schema, pyarrow shows the file's key-value metadata (ours, added
            # at the end) as the schema metadata: pq.read_schema(path).metadata[b"mask_impact"].
            parquet_writer = pq.ParquetWriter(temps["parquet"], arrow.schema, compression="snappy",
                                              store_schema=False)
            parquet_writer.write_table(arrow)
        if "csv" in temps:
            table.to_csv(temps["csv"], index=False, float_format="%.9g")
        if "json" in temps:
            json_file = open(temps["json"], "w", encoding="utf-8")
            json_file.write(_json_body(table)[:-1])
        metadata.setdefault("timings", {})["write_s"] = round(time.perf_counter() - started, 4)
        encoded = json.dumps(metadata, ensure_ascii=False)
        if parquet_writer is not None:
            parquet_writer.add_key_value_metadata({METADATA_KEY: encoded.encode()})
            parquet_writer.close()
            parquet_writer = None
        if json_file is not None:
            json_file.write(f', "metadata": {encoded}}}')
            json_file.close()
            json_file = None
        if "meta" in temps:
            Path(temps["meta"]).write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
        for fmt, temp in temps.items():
            os.replace(temp, paths[fmt])
        temps.clear()
    finally:
        for handle in (parquet_writer, json_file):
            if handle is not None:
                handle.close()
        for temp in temps.values():
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
    return {fmt: str(p) for fmt, p in paths.items()}


def _json_body(table: pd.DataFrame) -> str:
    """pandas' table orient; categoricals as plain strings so the schema stays simple."""
    plain = table.astype({c: str for c in table.columns if isinstance(table[c].dtype, pd.CategoricalDtype)})
    return plain.to_json(orient="table", index=False, double_precision=9, force_ascii=False)


def read_metadata(path) -> dict:
    """Metadata of any of the three formats."""
    path = Path(path)
    if path.suffix == ".parquet":
        return json.loads(pq.read_schema(path).metadata[METADATA_KEY])
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
    return pd.read_csv(path, keep_default_na=False)
