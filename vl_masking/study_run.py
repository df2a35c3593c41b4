"""Running a study (study.py has its directory's layout): this process's examples through one loaded model,
their rows held and written as chunks, merged into the process's part, the manifest part kept, Ctrl-C and
SIGTERM writing what finished; and `run_study`, the Python API's entry."""

import json
import os
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from . import console
from .errors import UsageError
from .results import (METADATA_KEY, remove_stale_temporaries, signals_held, signals_ignored, temporary_beside,
                      write_bytes_atomically, write_text_atomically)
from .shard import Shard
from .study import (SETTLED, Example, Study, check_ownership, conform, data_files, file_metadata, merged_entries,
                    now_utc, read_study, stale_chunks, unmatched_chunks, write_manifest)

CHUNK_SECONDS = 300  # a killed study loses at most this much work
CHUNK_ROWS = 1 << 20  # and holds at most about this many rows in memory
TARGET_COLUMNS = ("target_token", "predicted_token", "correct", "base_prob")  # per example and step
FINAL = ("done", "excluded")  # an example in one of these is not run again by --resume

# -- the run ---------------------------------------------------------------------------------------

class RankWriter:
    """One rank's results of one measure: held in memory, written as chunks, merged into its part at the end."""

    def __init__(self, directory: Path, rank: int, study_meta: dict, token: str | None = None):
        self.directory, self.rank, self.study_meta = directory, rank, study_meta
        self.tables, self.names, self.rows = [], [], 0
        self.schema_meta = None  # the first example's metadata (measure, schema, model...): every file has it
        # Chunks sort in the order they were written; the measures' chunks of one flush share their name.
        self.token = token or f"{time.time_ns():020d}"
        self.count = 0

    def add(self, name: str, arrow, metadata: dict, own: tuple = ()) -> None:
        """One example's rows; own: its measure's own metadata keys (kept, with SHARED_METADATA)."""
        if self.schema_meta is None:
            self.schema_meta = {k: metadata[k] for k in (*SHARED_METADATA, *own) if k in metadata}
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
                    writer.write_table(conform(pq.read_table(source), schema))
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


SHARED_METADATA = ("tool", "tool_version", "tool_kind", "torch_version", "transformers_version", "model",
                   "model_type", "family", "dtype", "device", "measure", "measures", "target", "mask_mode",
                   "vision_attention", "model_vision_attention", "mask_unit", "text_unit", "layers", "num_layers",
                   "num_heads", "num_kv_heads", "hidden_size", "num_tokens", "schema")  # and each measure's own


def run_examples(study: Study, resume: bool = False, log=None, loaded=None) -> int:
    """Run this process's examples; returns the exit code (0 all done or left out, 1 some failed, 130 / 143
    interrupted). loaded: the study's model already loaded (inputs.load_model), so that it is not read twice."""
    shard = Shard.from_environment()
    log = log or console.write
    check_ownership(study, resume, shard)
    loaded = _load_tokenizer(study, shard, loaded)  # every example's prompt checked before any file is written
    for directory in study.directories.values():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "_manifest").mkdir(exist_ok=True)
    with rank_lock(study.directory, shard):
        return _run_locked(study, shard, resume, log, loaded)


def _load_tokenizer(study: Study, shard: Shard, loaded=None):
    """The model's tokenizer (and image processor) without its weights (unless `loaded` is given), with every
    example of this rank rendered through the prompt format (a chat template that fails fails here, in one line
    naming the example, before the weights load and before the study writes a file)."""
    from .inputs import load_model, render_prompt

    mine = [e for e in study.examples if shard.owns(e)]
    if not mine:
        return None
    if loaded is None:
        loaded = load_model(replace(mine[0].settings, device=shard.device(mine[0].settings.device)), weights=False)
    for example in mine:
        try:
            render_prompt(loaded, example.settings, len(example.settings.images))
        except UsageError as exc:
            raise UsageError(f"example {example.name} (row {example.row}): {exc}") from None
    return loaded


def _run_locked(study: Study, shard: Shard, resume: bool, log, loaded) -> int:
    for directory in study.directories.values():
        remove_stale_temporaries(directory)
        for chunk in stale_chunks(directory):
            chunk.unlink(missing_ok=True)
    for chunk in unmatched_chunks(list(study.directories.values()), shard.rank):
        chunk.unlink(missing_ok=True)
    for picture, data in study.pictures:  # each rank writes the same bytes: an atomic rename, no lock
        if not picture.exists() or picture.read_bytes() != data:
            picture.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(picture, data)
    description = {**study.description, "fingerprint": study.fingerprint, "measures": list(study.measures),
                   "examples": [{"example_id": e.name, "row": e.row} for e in study.examples]}
    write_text_atomically(study.directory / "_study.json",
                          json.dumps(description, indent=2, ensure_ascii=False, default=str) + "\n")
    mine = [e for e in study.examples if shard.owns(e)]
    previous = {e["name"]: e for e in merged_entries(study, [e.name for e in mine])} if resume else {}
    todo = [e for e in mine if previous.get(e.name, {}).get("status") not in FINAL]
    entries = {e.name: previous.get(e.name) or {"name": e.name, "row": e.row, "status": "pending"} for e in mine}
    part = Manifest(study.directory, shard)
    part.write(entries)
    log(f"Study {study.directory}: {len(study.examples)} examples from {study.table}")
    if shard.size > 1:
        log(f"process {shard.rank + 1} of {shard.size}: {len(mine)} examples")
    if resume:
        log(f"resume: {len(mine) - len(todo)} example(s) already done, {len(todo)} to run")
    code = _run_examples(study, shard, todo, entries, part, log, loaded)
    merged = write_manifest(study, shard)
    log(study_summary(merged, {e.name for e in mine}, study, shard))
    return code


def _run_examples(study: Study, shard: Shard, todo: list, entries: dict, part: "Manifest", log, loaded) -> int:
    token = f"{time.time_ns():020d}"
    writers = {m: RankWriter(d, shard.rank, {k: v for k, v in study.description.items() if k != "overrides"}, token)
               for m, d in study.directories.items()}
    started, last_write, done = time.monotonic(), time.monotonic(), 0
    try:
        for example in todo:
            if loaded.model is None:
                _load_weights(loaded, example.settings, shard, log)
            entry = entries[example.name]
            entry.update(status="running", updated_utc=now_utc(), process=shard.rank)
            entry.update(_run_example(example, loaded, study, writers, shard, log))
            entry["updated_utc"] = now_utc()
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
        with signals_ignored():  # a second Ctrl-C or SIGTERM must not cut short the write of what finished
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


@contextmanager
def rank_lock(directory: Path, shard: Shard):
    """This rank of the study, held by one process at a time: an exclusive flock on _manifest/rank-N.lock,
    which the kernel releases when the process ends however it ends (a kill leaves no stale lock). A second
    process (a --resume while the first still runs) is refused before it loads the model. On a file system
    without locks a warning says that nothing stops a second process."""
    import fcntl

    path = Path(directory) / "_manifest" / f"rank-{shard.rank:05d}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise UsageError(f"the study {directory} is already running ({holder}): wait for it to finish or "
                             "stop it, then run again with --resume") from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks
            print(f"warning: {path.parent}: the file system has no locks ({exc.strerror}): make sure no other "
                  "process runs this study's rank", file=sys.stderr)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {now_utc()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _write_held(writers: dict, entries: dict) -> None:
    for writer in writers.values():
        for name in writer.flush():
            entries[name]["status"] = "done"


def _load_weights(loaded, settings, shard: Shard, log) -> None:
    from .inputs import load_weights

    load_weights(loaded, replace(settings, device=shard.device(settings.device)))
    log(console.describe_model(loaded))


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
        written = [(a, *a.measure.in_study(a.metadata, example.per_row)) for a in result.analyses]
        arrows = [(a, meta, example_rows(a.table, meta, example, renamed)) for a, meta, renamed in written]
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
    for analysis, meta, arrow in arrows:
        writers[analysis.measure.name].add(example.name, arrow, meta, own=tuple(analysis.measure.metadata()))
        rows += arrow.num_rows
    meta = result.metadata
    return {"status": "held", "rows": rows, "error": None, "run_id": meta["run_id"], "prompt": meta["prompt"],
            "generated_text": meta["generated_text"], "target": meta["targets"][0] if meta["targets"] else None,
            "timings": {**meta["timings"], "total_s": round(time.perf_counter() - started, 4)}}


def example_rows(table, metadata: dict, example: Example, renamed: dict):
    """The measure's rows of one example as Arrow, with example_id, the target columns (per step) and the
    table's own columns (a name the measure uses already gets the prefix `dataset_`); renamed: its series'
    values as the study names them (Measure.in_study)."""
    import numpy as np
    import pandas as pd

    from .results import to_arrow

    table = table.copy()
    if renamed:  # each row's series as the study wrote it
        series = metadata["schema"]["series"]["column"]
        table[series] = pd.Categorical(table[series].astype(str).map(lambda f: renamed.get(f, f)),
                                       categories=list(dict.fromkeys(renamed.values())))
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
    table.insert(0, "example_id", pd.Categorical([example.name] * len(table)))
    arrow = to_arrow(table)
    for column, (kind, value) in example.values.items():
        name = "dataset_" + column if column in table.columns else column
        arrow = arrow.append_column(name, carried_column(kind, value, arrow.num_rows))
    return arrow


def carried_column(kind: str, value, rows: int):
    """A table column's value on each of an example's rows, in the column's one type for the study (text as
    dictionary-encoded strings, so that a value repeated on every row is stored once)."""
    import pyarrow as pa

    types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}
    column = pa.array([value] * rows, type=types[kind])
    return column.dictionary_encode() if kind == "str" else column


class Manifest:
    """This rank's manifest part, written by this rank only (no lock: a cluster file system may have none)."""

    def __init__(self, directory: Path, shard: Shard):
        self.path = Path(directory) / "_manifest" / f"rank-{shard.rank:05d}.json"
        self.shard = shard

    def write(self, entries: dict) -> None:
        document = {"rank": self.shard.rank, "processes": self.shard.size, "updated_utc": now_utc(),
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
        if data_files(directory):
            lines.append(f"Study ({measure}): {directory}   pd.read_parquet(...) reads it")
        else:
            lines.append(f"Study ({measure}): {directory} holds no rows: no example was written (see the manifest)")
    lines.append(f"Manifest: {study.manifest_path}" + ("" if study.manifest_path.exists() else
                                                         " (written by the process that finishes last)"))
    return "\n".join(lines)


def run_study(dataset, tool: str = "vl", columns=None, prompt_template: str | None = None, where: str | None = None,
              sample: int | None = None, seed: int = 0, limit: int | None = None, only_correct: bool = False,
              resume: bool = False, log=None, **options):
    """Every example of a dataset table (CSV, JSON Lines, Parquet, or a `datasets` save_to_disk directory)
    through one loaded model into one study directory, as `--dataset` does; returns the study's table
    (study.read_study; a dict {measure: table} with several measures).

        table = run_study("gqa.parquet", model="Qwen/Qwen2.5-VL-3B-Instruct",
                          columns={"id": "qid", "image": "img", "question": "q", "answer": "a"},
                          prompt_template="{question} Answer the question using a single word or phrase.",
                          measure="flow", flow=["image->question", "question->last"], target="answer",
                          only_correct=True, output="gqa_study")
        table.groupby(["type", "flow", "layer"]).rel_change_pct.mean()
    """
    from .api import _option_values, _quiet as quiet, _warn
    from .dataset import load_dataset
    from .tools import TOOLS

    if isinstance(columns, dict):
        columns = ",".join(f"{k}={v}" for k, v in columns.items())
    study = load_dataset(dataset, TOOLS[tool], _option_values(options), columns=columns, template=prompt_template,
                         limit=limit, sample=sample, seed=seed, where=where, only_correct=only_correct)
    for warning in study.warnings:
        _warn(warning)
    check_ownership(study, resume, Shard.from_environment())
    code = run_examples(study, resume=resume, log=log or quiet)
    if code not in (0, 1):
        raise KeyboardInterrupt
    if code == 1:
        _warn(f"some examples failed: see {study.manifest_path}")
    tables = {m: read_study(d) for m, d in study.directories.items()}
    return next(iter(tables.values())) if len(tables) == 1 else tables


def _quiet(*_args, **_kwargs):
    pass
