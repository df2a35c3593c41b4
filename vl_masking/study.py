"""A study: every example of a dataset table through one loaded model, into one result directory.

    OUTPUT_DIR/NAME/                   NAME: --output, default the table's file name without its suffix
      part-r00000.parquet              rank 0's examples: the measure's rows, with example_id, the target
      part-r00001.parquet              columns (target_token, predicted_token, correct, base_prob) and the
                                       table's own columns; pd.read_parquet(NAME) reads them all
      _study.json                      the table, its columns, the options and every example's id
      _manifest/rank-00000.json        rank 0's examples: status, rows, timings, target, error
      _manifest/rank-00000.lock        held (flock) by the process running rank 0
      _manifest.json                   every rank's part merged: what finished, failed, was left out

The manifest and the lock are the runner's (runner.py), the same as a batch's; study_run.py runs a study
through it.

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
only its own files, so no file is shared; the rank that finds every example settled writes the merged
manifest, and every --resume merges again. A second process on a rank that runs is refused (the
runner's locking policy).

With several measures an example is done when every measure's directory holds its rows: the measures'
chunks of one flush share a name, and a chunk found in some directories only (a kill between two
renames) is removed by the next run, its examples run again.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .results import METADATA_KEY
from .shard import Shard


@dataclass
class Example:
    index: int  # position among the selected rows (its rank is index mod WORLD_SIZE)
    name: str  # example_id
    row: int  # row number in the table (1 = the first data row)
    settings: object  # RunSettings
    values: dict  # the table's own columns for this row: {column: (kind, value)}, carried into every result row
    per_row: dict = field(default_factory=dict)  # the options holding {placeholders}, as written (Measure.in_study)


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


def examples_written(directories) -> dict:
    """example_id -> the data file (of the first directory) that holds its rows, for the examples whose rows
    every measure's directory holds: a process killed between two measures' writes has written an example
    in one of them only, and that example is not done."""
    found = [{name: path.name for path, meta in data_files(directory)
              for name in meta.get("study_file", {}).get("examples", ())} for directory in directories]
    return {name: file for name, file in found[0].items() if all(name in other for other in found[1:])}


def unmatched_chunks(directories, rank: int) -> list:
    """This rank's chunk files that are not in every measure's directory (the measures' chunks of one flush
    share a name; a chunk already merged counts as present): what a process killed in the middle of a flush
    left in some directories only. Their examples are run again."""
    import pyarrow.parquet as pq

    present = []
    for directory in directories:
        names = {p.name for p in Path(directory).glob(f"chunk-r{rank:05d}-*.parquet")}
        part = Path(directory) / f"part-r{rank:05d}.parquet"
        if part.exists():
            names.update(file_metadata(part, pq).get("study_file", {}).get("replaces", ()))
        present.append(names)
    everywhere = set.intersection(*present)
    return [Path(d) / name for d, names in zip(directories, present) for name in sorted(names - everywhere)
            if (Path(d) / name).exists()]


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


def conform(table, schema):
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
    table = pa.concat_tables([conform(t, tables[0].schema) for t in tables]).to_pandas()
    meta = dict(files[0][1])
    meta.pop("study_file", None)
    table.attrs["metadata"] = meta
    manifest = directory / "_manifest.json"
    if manifest.exists():
        table.attrs["manifest"] = json.loads(manifest.read_text(encoding="utf-8"))
    return table
