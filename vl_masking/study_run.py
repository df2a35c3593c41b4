"""A study as a job of the runner (runner.py: the loop, the manifest, the lock, --resume, signals; study.py:
the directory's layout): this process's examples through one loaded model, their rows held and written as
chunks, merged into the process's part; and `run_study`, the Python API's entry."""

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from .errors import UsageError
from .results import (METADATA_KEY, remove_stale_temporaries, signals_held, temporary_beside,
                      write_bytes_atomically, write_text_atomically)
from .runner import Job, run_items
from .shard import Shard
from .study import (Example, Study, check_ownership, conform, data_files, examples_written, file_metadata,
                    read_study, stale_chunks, unmatched_chunks)

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


class StudyRun(Job):
    """A study as the runner's job: each example's rows held, written as chunks, merged into the rank's part."""

    kind, noun, plural = "study", "example", "examples"
    settled = ("done", "excluded", "failed")
    kept_note = "the examples that finished are written"

    def __init__(self, study: Study, shard: Shard):
        super().__init__(study.examples, study.manifest_path, study.directory / "_manifest", shard)
        self.study = study
        token = f"{time.time_ns():020d}"  # the measures' chunks of one flush share their name
        meta = {k: v for k, v in study.description.items() if k != "overrides"}
        self.writers = {m: RankWriter(d, shard.rank, meta, token) for m, d in study.directories.items()}
        self.last_write = time.monotonic()

    def title(self) -> str:
        return f"Study {self.study.directory}: {len(self.items)} examples from {self.study.table}"

    def what(self) -> str:
        return f"the study {self.study.directory}"

    def header(self) -> dict:
        return {"table": str(self.study.table), "directories": {m: str(d) for m, d in self.study.directories.items()}}

    def prepare(self, shard: Shard) -> None:
        """What a killed run left: temporaries, chunks already merged, chunks of a flush cut short; then the
        pictures the table holds as bytes and the description."""
        study = self.study
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

    def fresh(self, example: Example) -> dict:
        return {"name": example.name, "row": example.row, "status": "pending"}

    def to_run(self, example: Example, entry: dict | None, resume: bool) -> bool:
        return not (resume and entry is not None and entry.get("status") in FINAL)

    def reconcile(self, entries: list) -> list:
        """An example is done where every measure's data files hold it (the data is the record; an entry may
        lag behind it); one recorded done or running whose rows were never written was interrupted."""
        written = examples_written(list(self.study.directories.values()))
        out = []
        for entry in entries:
            entry = dict(entry)
            if entry["name"] in written:
                entry.update(status="done", file=written[entry["name"]], error=None)
            elif entry.get("status") in ("done", "running"):
                entry["status"] = "interrupted"
            out.append(entry)
        return out

    def run(self, example: Example, models, shard: Shard, log) -> dict:
        """One example, start to rows held."""
        from .analysis import Excluded
        from .api import run

        settings = replace(example.settings, device=shard.device(example.settings.device))
        started = time.perf_counter()
        loaded, _ = models.get(settings)
        try:
            result = run(settings, save=False, progress=False, log=_quiet, loaded=loaded, warn=log,
                         only_correct=self.study.only_correct)
        except Excluded as exc:
            return {"status": "excluded", "reason": str(exc), "target": exc.target, "rows": 0, "error": None,
                    "timings": {"total_s": round(time.perf_counter() - started, 4)}}
        written = [(a, *a.measure.in_study(a.metadata, example.per_row)) for a in result.analyses]
        arrows = [(a, meta, example_rows(a.table, meta, example, renamed)) for a, meta, renamed in written]
        rows = 0
        for analysis, meta, arrow in arrows:
            self.writers[analysis.measure.name].add(example.name, arrow, meta, own=tuple(analysis.measure.metadata()))
            rows += arrow.num_rows
        meta = result.metadata
        return {"status": "held", "rows": rows, "error": None, "run_id": meta["run_id"], "prompt": meta["prompt"],
                "generated_text": meta["generated_text"], "target": meta["targets"][0] if meta["targets"] else None,
                "timings": {**meta["timings"], "total_s": round(time.perf_counter() - started, 4)}}

    def after(self, entries: dict) -> None:
        held = sum(w.rows for w in self.writers.values())
        if held >= CHUNK_ROWS or time.monotonic() - self.last_write >= CHUNK_SECONDS:
            _write_held(self.writers, entries)
            self.last_write = time.monotonic()

    def finish(self, entries: dict, stopped: bool) -> None:
        """What is held written as chunks; at the end of the share, the rank's chunks merged into its part (a
        stop leaves them as chunks: the next run merges them)."""
        _write_held(self.writers, entries)
        if not stopped:
            for writer in self.writers.values():
                writer.merge()

    def summary(self, merged: list, mine: set, shard: Shard) -> str:
        return study_summary(merged, mine, self.study, shard)


def run_examples(study: Study, resume: bool = False, log=None, loaded=None) -> int:
    """Run this process's examples; returns the exit code (0 all done or left out, 1 some failed, 130 / 143
    interrupted). loaded: the study's model already loaded (inputs.load_model), so that it is not read twice."""
    shard = Shard.from_environment()
    check_ownership(study, resume, shard)
    loaded = _load_tokenizer(study, shard, loaded)  # every example's prompt checked before any file is written
    for directory in study.directories.values():
        directory.mkdir(parents=True, exist_ok=True)
    mine = [e for e in study.examples if shard.owns(e)]
    preloaded = None if loaded is None else (replace(mine[0].settings, device=shard.device(mine[0].settings.device)),
                                             loaded)
    return run_items(StudyRun(study, shard), resume=resume, log=log, preloaded=preloaded)


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
            render_prompt(loaded, example.settings, len(example.settings.images), len(example.settings.videos))
        except UsageError as exc:
            raise UsageError(f"example {example.name} (row {example.row}): {exc}") from None
    return loaded


def _write_held(writers: dict, entries: dict) -> None:
    for writer in writers.values():
        for name in writer.flush():
            entries[name]["status"] = "done"


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
    if shard.size == 1 or all(e["status"] in StudyRun.settled for e in merged):
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
