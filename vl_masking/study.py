"""A study: every example of a dataset table through one loaded model, into one result directory.

    OUTPUT_DIR/NAME/                   NAME: --output, default the table's file name without its suffix
      part-r00000.parquet              rank 0's examples: the measure's rows, with example_id, the target
      part-r00001.parquet              columns (target_token, predicted_token, correct, base_prob) and the
                                       table's own columns; pd.read_parquet(NAME) reads them all
      _study.json                      the table, its columns, the options and every example's id
      _manifest/rank-00000.json        rank 0's examples: status, rows, timings, target, error
      _manifest.json                   every rank's part merged: what finished, failed, was left out

With several measures (--measure layer,attention) each has its own directory NAME.MEASURE/ holding its
parts; the manifest and description live in the first. Names starting with `_` are skipped by
pyarrow.dataset and pandas, so the directory reads as one table.

The data files are the record of what is done: a file's metadata lists its examples. Results are
held in memory and written as a new file `chunk-r00000-*.parquet` every CHUNK_SECONDS or CHUNK_ROWS,
and on Ctrl-C or SIGTERM; at the end of a rank's share its chunks are merged into its one part file
(whose metadata names the chunks it replaced, so a merge cut short is finished by the next run). A
killed process loses at most the examples not yet written; `--resume` runs those again and the others
never. A failed example is recorded (with its error) and the study goes on.

Under `accelerate launch` or torchrun example i belongs to rank i mod WORLD_SIZE. Each rank writes
only its own files, so no file is shared and no lock is needed (a cluster file system may have none);
the rank that finishes merges the manifest parts it finds, and every --resume does again.
"""

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__, console
from .batch import Shard
from .errors import UsageError
from .results import (METADATA_KEY, remove_stale_temporaries, signals_held, temporary_beside, write_bytes_atomically,
                      write_text_atomically)

CHUNK_SECONDS = 300  # a killed study loses at most this much work
CHUNK_ROWS = 1 << 20  # and holds at most about this many rows in memory
TARGET_COLUMNS = ("target_token", "predicted_token", "correct", "base_prob")  # per example and step
FINAL = ("done", "excluded")  # an example in one of these is not run again by --resume


@dataclass
class Example:
    index: int  # position among the selected rows (its rank is index mod WORLD_SIZE)
    name: str  # example_id
    row: int  # row number in the table (1 = the first data row)
    settings: object  # RunSettings
    values: dict  # the table's own columns for this row (carried into every result row)


@dataclass
class Study:
    table: Path
    tool: object
    directory: Path  # the first measure's directory
    examples: list
    measures: tuple
    description: dict  # the table, columns, template, row selection, options: what _study.json says
    only_correct: bool = False
    warnings: tuple = ()
    fingerprint: str = ""  # of the description: a --resume with other options is refused
    directories: dict = field(default_factory=dict)  # measure -> its directory
    pictures: list = field(default_factory=list)  # [(path in _images/, bytes)]: pictures the table holds as bytes

    @property
    def manifest_path(self) -> Path:
        return self.directory / "_manifest.json"


def study_directories(output_dir: Path, name: str, measures) -> dict:
    if len(measures) == 1:
        return {measures[0]: output_dir / name}
    return {m: output_dir / f"{name}.{m}" for m in measures}


# -- what a directory holds ------------------------------------------------------------------------

def data_files(directory: Path) -> list:
    """The data files of a study directory that count: every part and chunk, less the chunks a part replaced
    (a merge that was cut short after its part was in place)."""
    import pyarrow.parquet as pq

    files, replaced = [], set()
    for path in sorted(Path(directory).glob("*.parquet")):
        if path.name.startswith((".", "_")):
            continue
        meta = file_metadata(path, pq)
        replaced.update(meta.get("study_file", {}).get("replaces", ()))
        files.append((path, meta))
    return [(p, m) for p, m in files if p.name not in replaced]


def stale_chunks(directory: Path) -> list:
    import pyarrow.parquet as pq

    replaced = set()
    for path in Path(directory).glob("part-*.parquet"):
        replaced.update(file_metadata(path, pq).get("study_file", {}).get("replaces", ()))
    return [Path(directory) / name for name in sorted(replaced) if (Path(directory) / name).exists()]


def file_metadata(path: Path, pq) -> dict:
    try:
        return json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{path}: not a mask-impact study file ({type(exc).__name__})") from None


def examples_written(directory: Path) -> dict:
    """example_id -> the data file that holds its rows."""
    return {name: path.name for path, meta in data_files(directory)
            for name in meta.get("study_file", {}).get("examples", ())}


def manifest_parts(directory: Path) -> list:
    parts = []
    for path in sorted((Path(directory) / "_manifest").glob("rank-*.json")):
        try:
            parts.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # a part cut short: its examples' data files still say what is done
    return parts


def merged_entries(directory: Path, names: list) -> list:
    """One entry per example, in table order: the newest entry any rank recorded, `done` where a data file
    holds it (the data is the record; an entry may lag behind it)."""
    latest = {}
    for part in manifest_parts(directory):
        for entry in part.get("examples", []):
            name = entry.get("name")
            if name and (name not in latest or entry.get("updated_utc", "") >= latest[name].get("updated_utc", "")):
                latest[name] = entry
    written = examples_written(directory)
    out = []
    for name in names:
        entry = dict(latest.get(name) or {"name": name, "status": "pending"})
        if name in written:
            entry.update(status="done", file=written[name], error=None)
        elif entry.get("status") in ("done", "running"):
            entry["status"] = "interrupted"  # recorded, but its rows were never written
        out.append(entry)
    return out


SETTLED = ("done", "excluded", "failed")


def write_manifest(study: Study, shard: Shard) -> list:
    """The merged manifest, written when every example is settled (or by a single process): a rank that
    finishes while another still runs leaves it to that one, so the file never goes back in time."""
    names = [e.name for e in study.examples]
    entries = merged_entries(study.directory, names)
    if shard.size > 1 and not all(e["status"] in SETTLED for e in entries):
        return entries
    counts = {}
    for entry in entries:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    document = {"tool": "mask-impact", "tool_version": __version__, "table": str(study.table),
                "directories": {m: str(d) for m, d in study.directories.items()}, "processes": shard.size,
                "updated_utc": _now(), "counts": counts, "examples": entries}
    write_text_atomically(study.manifest_path, json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")
    return entries


# -- before the model loads ----------------------------------------------------------------------

def check_ownership(study: Study, resume: bool, shard: Shard) -> None:
    """A study owns its directory: a fresh start refuses one that holds this rank's results (or, for rank 0,
    those of a rank this launch does not have); --resume refuses one made with other options."""
    described = study.directory / "_study.json"
    if resume:
        if described.exists():
            try:
                earlier = json.loads(described.read_text(encoding="utf-8")).get("fingerprint")
            except (OSError, ValueError):
                earlier = None
            if earlier not in (None, study.fingerprint):
                raise UsageError(f"--resume: the study {study.directory} was made with other options or rows; run "
                                 "it with the same ones, or give another --output")
        return
    for directory in study.directories.values():
        mine = [p for p in directory.glob(f"*-r{shard.rank:05d}*.parquet")]
        mine += list((directory / "_manifest").glob(f"rank-{shard.rank:05d}.json"))
        if shard.rank == 0:
            mine += [p for p in directory.glob("*-r*.parquet") if _rank_of(p.name) >= shard.size]
        if mine:
            raise UsageError(f"the study {directory} already holds results ({mine[0].name}): --resume finishes it, "
                             "or give another --output")


def _rank_of(name: str) -> int:
    try:
        return int(name.split("-r", 1)[1][:5])
    except (IndexError, ValueError):
        return -1


# -- the run ---------------------------------------------------------------------------------------

class RankWriter:
    """One rank's results of one measure: held in memory, written as chunks, merged into its part at the end."""

    def __init__(self, directory: Path, rank: int, study_meta: dict):
        self.directory, self.rank, self.study_meta = directory, rank, study_meta
        self.tables, self.names, self.rows = [], [], 0
        self.schema_meta = None  # the first example's metadata (measure, schema, model...): every file has it
        self.token = f"{time.time_ns():020d}"  # chunks sort in the order they were written
        self.count = 0

    def add(self, name: str, arrow, metadata: dict) -> None:
        if self.schema_meta is None:
            self.schema_meta = {k: metadata[k] for k in SHARED_METADATA if k in metadata}
        self.tables.append(arrow)
        self.names.append(name)
        self.rows += arrow.num_rows

    def flush(self) -> list:
        """Write what is held as one chunk file; returns the examples it holds."""
        if not self.tables:
            return []
        import pyarrow as pa

        table = pa.concat_tables(self.tables, promote_options="permissive")
        path = self.directory / f"chunk-r{self.rank:05d}-{self.token}-{self.count:05d}.parquet"
        self._write(table, path, {"examples": self.names})
        written, self.tables, self.names, self.rows = self.names, [], [], 0
        self.count += 1
        return written

    def merge(self) -> None:
        """This rank's chunks and earlier part into its one part file (one table read at a time)."""
        import pyarrow.parquet as pq

        part = self.directory / f"part-r{self.rank:05d}.parquet"
        chunks = sorted(self.directory.glob(f"chunk-r{self.rank:05d}-*.parquet"))
        sources = ([part] if part.exists() else []) + chunks
        if not chunks:
            return
        examples = [n for s in sources for n in file_metadata(s, pq).get("study_file", {}).get("examples", ())]
        first = pq.read_table(sources[0])
        schema = first.schema.remove_metadata()
        meta = {**json.loads(first.schema.metadata[METADATA_KEY]),
                "study_file": {"rank": self.rank, "examples": examples, "replaces": [c.name for c in chunks]}}
        schema = schema.with_metadata({METADATA_KEY: json.dumps(meta, default=str)})
        temp = temporary_beside(part)
        try:
            with pq.ParquetWriter(temp, schema) as writer:
                writer.write_table(first.replace_schema_metadata(schema.metadata))
                del first
                for source in sources[1:]:
                    writer.write_table(_conform(pq.read_table(source), schema))
            with signals_held():
                os.replace(temp, part)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        for chunk in chunks:  # listed in the part as replaced: a reader skips them until they are gone
            chunk.unlink(missing_ok=True)

    def _write(self, table, path: Path, study_file: dict) -> None:
        import pyarrow.parquet as pq

        meta = {**self.schema_meta, "study": self.study_meta, "study_file": {"rank": self.rank, **study_file}}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, default=str)})
        temp = temporary_beside(path)
        try:
            pq.write_table(table, temp)
            with signals_held():
                os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _conform(table, schema):
    """A later file's table in the first file's column order and types (a column that was all missing in
    one chunk, say), so that the part has one schema."""
    import pyarrow as pa

    columns = []
    for f in schema:
        if f.name in table.column_names:
            column = table[f.name]
            columns.append(column if column.type == f.type else column.cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


# What every data file of a study says once (the schema the figures read, the model, the options); what
# differs per example (prompt, generation, targets, timings) is in the manifest.
SHARED_METADATA = ("tool", "tool_version", "tool_kind", "torch_version", "transformers_version", "model",
                   "model_type", "family", "dtype", "device", "measure", "measures", "target", "mask_mode",
                   "vision_attention", "model_vision_attention", "mask_unit", "text_unit", "layers", "num_layers",
                   "num_heads", "num_kv_heads", "hidden_size", "num_tokens", "schema", "flows", "window", "windows",
                   "variants", "attention_variants", "flow_all_blocked")


def run_study(study: Study, resume: bool = False, log=None) -> int:
    """Run this process's examples; returns the exit code (0 all done or left out, 1 some failed, 130 / 143
    interrupted)."""
    shard = Shard.from_environment()
    log = log or console.write
    check_ownership(study, resume, shard)
    for directory in study.directories.values():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "_manifest").mkdir(exist_ok=True)
        remove_stale_temporaries(directory)
        for chunk in stale_chunks(directory):
            chunk.unlink(missing_ok=True)
    for picture, data in study.pictures:  # each rank writes the same bytes: an atomic rename, no lock
        if not picture.exists() or picture.read_bytes() != data:
            picture.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(picture, data)
    description = {**study.description, "fingerprint": study.fingerprint, "measures": list(study.measures),
                   "examples": [{"example_id": e.name, "row": e.row} for e in study.examples]}
    write_text_atomically(study.directory / "_study.json",
                          json.dumps(description, indent=2, ensure_ascii=False, default=str) + "\n")
    mine = [e for e in study.examples if e.index % shard.size == shard.rank]
    previous = {e["name"]: e for e in merged_entries(study.directory, [e.name for e in mine])} if resume else {}
    todo = [e for e in mine if previous.get(e.name, {}).get("status") not in FINAL]
    entries = {e.name: previous.get(e.name) or {"name": e.name, "row": e.row, "status": "pending"} for e in mine}
    part = Manifest(study.directory, shard)
    part.write(entries)
    log(f"Study {study.directory}: {len(study.examples)} examples from {study.table}")
    if shard.size > 1:
        log(f"process {shard.rank + 1} of {shard.size}: {len(mine)} examples")
    if resume:
        log(f"resume: {len(mine) - len(todo)} example(s) already done, {len(todo)} to run")
    code = _run_examples(study, shard, todo, entries, part, log)
    merged = write_manifest(study, shard)
    log(study_summary(merged, {e.name for e in mine}, study, shard))
    return code


def _run_examples(study: Study, shard: Shard, todo: list, entries: dict, part: "Manifest", log) -> int:
    writers = {m: RankWriter(d, shard.rank, {k: v for k, v in study.description.items() if k != "overrides"})
               for m, d in study.directories.items()}
    started, last_write, done = time.monotonic(), time.monotonic(), 0
    loaded = None
    try:
        for example in todo:
            if loaded is None:
                loaded = _load(example.settings, shard, log)
            entry = entries[example.name]
            entry.update(status="running", updated_utc=_now(), process=shard.rank)
            entry.update(_run_example(example, loaded, study, writers, shard, log))
            entry["updated_utc"] = _now()
            done += 1
            held = sum(w.rows for w in writers.values())
            if held >= CHUNK_ROWS or time.monotonic() - last_write >= CHUNK_SECONDS:
                _write_held(writers, entries)
                last_write = time.monotonic()
            part.write(entries)
            log(progress_line(done, len(todo), started, example.name, entry))
        _write_held(writers, entries)
        for writer in writers.values():
            writer.merge()
        part.write(entries)
    except KeyboardInterrupt as exc:
        for entry in entries.values():
            if entry["status"] == "running":
                entry["status"] = "interrupted"
        _write_held(writers, entries)  # the examples that finished are kept
        part.write(entries)
        name = "terminated" if isinstance(exc, console.Terminated) else "interrupted"
        print(f"{name}: the examples that finished are written; run again with --resume to finish the study",
              file=sys.stderr)
        write_manifest(study, shard)
        return console.interrupt_code(exc)
    return 1 if any(entries[e.name]["status"] == "failed" for e in todo) else 0


def _write_held(writers: dict, entries: dict) -> None:
    for writer in writers.values():
        for name in writer.flush():
            entries[name]["status"] = "done"


def _load(settings, shard: Shard, log):
    from .inputs import load_model

    loaded = load_model(replace(settings, device=shard.device(settings.device)))
    log(console.describe_model(loaded))
    return loaded


def _run_example(example: Example, loaded, study: Study, writers: dict, shard: Shard, log) -> dict:
    """One example, start to rows held; returns what its manifest entry should say."""
    import torch

    from .analysis import Excluded
    from .api import run

    settings = replace(example.settings, device=shard.device(example.settings.device))
    started = time.perf_counter()
    try:
        result = run(settings, save=False, progress=False, log=_quiet, loaded=loaded, warn=log,
                     only_correct=study.only_correct)
        arrows = [(a, example_rows(a.table, a.metadata, example)) for a in result.analyses]
    except Excluded as exc:
        return {"status": "excluded", "reason": str(exc), "target": exc.target, "rows": 0, "error": None,
                "timings": {"total_s": round(time.perf_counter() - started, 4)}}
    except Exception as exc:  # noqa: BLE001 - a study records the failure and goes on
        error = f"{type(exc).__name__}: {exc}".strip()
        log(f"[{example.name}] failed: {error}")
        if isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        return {"status": "failed", "error": error, "traceback": traceback.format_exc(limit=-8),
                "timings": {"total_s": round(time.perf_counter() - started, 4)}}
    rows = 0
    for analysis, arrow in arrows:
        writers[analysis.measure.name].add(example.name, arrow, analysis.metadata)
        rows += arrow.num_rows
    meta = result.metadata
    return {"status": "held", "rows": rows, "error": None, "run_id": meta["run_id"], "prompt": meta["prompt"],
            "generated_text": meta["generated_text"], "target": meta["targets"][0] if meta["targets"] else None,
            "timings": {**meta["timings"], "total_s": round(time.perf_counter() - started, 4)}}


def example_rows(table, metadata: dict, example: Example):
    """The measure's rows of one example as Arrow, with example_id, the target columns (per step) and the
    table's own columns (a name the measure uses already gets the prefix `dataset_`)."""
    import numpy as np
    import pandas as pd

    from .results import to_arrow

    table = table.copy()
    steps = table["generation_step"].to_numpy()
    targets = {t["step"]: t for t in metadata["targets"]}
    for column in TARGET_COLUMNS:
        if column not in table.columns:
            values = [targets[s][column] for s in range(max(targets) + 1)] if targets else []
            per_step = np.asarray(values, dtype=np.float32 if column == "base_prob" else object)
            table[column] = per_step[steps] if len(steps) else per_step[:0]
            if column in ("target_token", "predicted_token"):
                table[column] = pd.Categorical(table[column].astype(str))
            if column == "correct":
                table[column] = table[column].astype(bool)
    carried = {}
    for column, value in example.values.items():
        carried["dataset_" + column if column in table.columns or column == "example_id" else column] = value
    table.insert(0, "example_id", pd.Categorical([example.name] * len(table)))
    for column, value in carried.items():
        table[column] = pd.Series([value] * len(table), dtype=_dtype_of(value)) if len(table) else pd.Series(
            [], dtype=_dtype_of(value))
    return to_arrow(table)


def _dtype_of(value) -> str:
    """One column type for a table column in every example (a study's files must agree)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    return "category"


class Manifest:
    """This rank's manifest part, written by this rank only (no lock: a cluster file system may have none)."""

    def __init__(self, directory: Path, shard: Shard):
        self.path = Path(directory) / "_manifest" / f"rank-{shard.rank:05d}.json"
        self.shard = shard

    def write(self, entries: dict) -> None:
        document = {"rank": self.shard.rank, "processes": self.shard.size, "updated_utc": _now(),
                    "examples": [dict(e, status="running" if e["status"] == "held" else e["status"])
                                 for e in entries.values()]}
        write_text_atomically(self.path, json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")


def progress_line(done: int, total: int, started: float, name: str, entry: dict) -> str:
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    status = {"held": "done"}.get(entry["status"], entry["status"])
    detail = f"{entry.get('rows', 0)} rows" if status == "done" else (entry.get("reason") or entry.get("error") or "")
    return (f"examples: {done}/{total} | {name}: {status} ({detail}) | {rate * 3600:.0f} examples/hour, "
            f"ETA {_clock(eta)}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def study_summary(merged: list, mine: set, study: Study, shard: Shard) -> str:
    """Counts of this process's examples (and of the whole study when it is settled), what failed, where it is."""
    def counted(entries):
        counts = {}
        for entry in entries:
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        return ", ".join(f"{n} {s}" for s, n in counts.items()) + f" (of {len(entries)})"

    lines = []
    if shard.size > 1:
        lines.append(f"Examples of process {shard.rank + 1}: {counted([e for e in merged if e['name'] in mine])}")
    if shard.size == 1 or all(e["status"] in SETTLED for e in merged):
        lines.append(f"Examples: {counted(merged)}")
    if study.only_correct:
        kept = sum(1 for e in merged if e["status"] == "done")
        judged = sum(1 for e in merged if e["status"] in FINAL)
        lines.append(f"--only-correct: kept {kept} of {judged} examples (the greedy first token is the answer's)")
    failed = [e for e in merged if e["status"] == "failed"]
    for entry in failed[:10]:
        lines.append(f"  failed {entry['name']}: {str(entry.get('error') or '').splitlines()[0]}")
    for measure, directory in study.directories.items():
        lines.append(f"Study ({measure}): {directory}   pd.read_parquet(...) reads it")
    lines.append(f"Manifest: {study.manifest_path}" + ("" if study.manifest_path.exists() else
                                                         " (written by the process that finishes last)"))
    return "\n".join(lines)


def read_study(directory) -> "pd.DataFrame":
    """A study directory's rows as one table (the data files that count: a chunk already merged into its part
    is left out), with the study's metadata and manifest in attrs["metadata"] and attrs["manifest"]."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    files = data_files(directory)
    if not files:
        raise UsageError(f"{directory}: no study results (no part-*.parquet or chunk-*.parquet)")
    tables = [pq.read_table(path) for path, _ in files]
    table = pa.concat_tables([_conform(t, tables[0].schema) for t in tables]).to_pandas()
    meta = dict(files[0][1])
    meta.pop("study_file", None)
    table.attrs["metadata"] = meta
    manifest = directory / "_manifest.json"
    if manifest.exists():
        table.attrs["manifest"] = json.loads(manifest.read_text(encoding="utf-8"))
    return table


def _quiet(*_args, **_kwargs):
    pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
