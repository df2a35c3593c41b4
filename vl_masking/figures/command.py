"""The figures command: arguments, which figures each file or set of files gets, staging into --out (a failed
run leaves nothing), and one line on stderr for bad input.
"""

import argparse
import glob
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from ..errors import UsageError
from ..measures import MEASURES
from ..reader_rules import head_index
from .averages import Run, _grouped, distinct_runs, evidence_columns, interval_words, sets_to_average, summarise
from .drawing import (DPI, PICTURE_MODES, _pyplot, aggregate_curves, check_picture, frame_layers, frame_maps, heads,
                      heatmap, layer_multiples, mapped_view, scatter, series_curves)
from .reading import Result, _layer_list, default_series, load, load_study, metric_columns, middle_layer

# -- the command line ---------------------------------------------------------------------------

class Staged:
    """Figures and tables written under temporary names, renamed into place only when every one is done:
    a run of the figures that fails half-way (exit 2) leaves nothing behind, not even the --out directory it
    made."""

    def __init__(self, out: Path):
        self.out, self.pending = out, []
        self.made = not out.exists()
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file, not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()  # writable: said now, not after the drawing
        except OSError as exc:
            self.discard()
            raise UsageError(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__})") from None

    def path(self, name: str) -> Path:
        final = self.out / name
        temp = final.with_name(f".{final.name}.figures-tmp")
        self.pending.append((temp, final))
        return temp

    def commit(self) -> list:
        for temp, final in self.pending:
            os.replace(temp, final)
        written, self.pending = [str(final) for _, final in self.pending], []
        self.made = False
        return written

    def discard(self) -> None:
        for temp, _ in self.pending:
            temp.unlink(missing_ok=True)
        self.pending = []
        if self.made:
            try:
                self.out.rmdir()  # made by this run and left empty
            except OSError:
                pass

    @contextmanager
    def writing(self):
        """The figures' writes: an OSError (a full disk, a read-only file system) is one line; on any failure
        nothing is left."""
        try:
            yield self
        except OSError as exc:
            raise UsageError(f"--out {self.out}: cannot write the figures ({exc.strerror or type(exc).__name__})") \
                from None
        finally:
            self.discard()


def save(fig, staged: Staged, stem: str, formats) -> None:
    for fmt in formats:
        fig.savefig(staged.path(f"{stem}.{fmt}"), format=fmt, dpi=DPI)
    _pyplot().close(fig)


def parse_args(argv, prog: str = "python -m vl_masking.figures"):
    from ..options import _OneLineParser

    parser = _OneLineParser(prog=prog, description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="result files (.parquet, .json, .csv), or globs; the formats of "
                                                 "one run count once; or a study directory (--dataset)")
    parser.add_argument("--group-by", metavar="COLUMN", help="with a study directory: one panel per value of this "
                        "column of the table (type, say), and the summary per value")
    parser.add_argument("--image", help="the picture (default: the path recorded in the metadata)")
    parser.add_argument("--evidence", metavar="ROW_COLUMN,COL_COLUMN",
                        help="with a study directory: the columns naming each example's evidence cell (planted "
                             "pictures: evidence_row,evidence_col); the curves split the image units into that "
                             "cell and the others")
    parser.add_argument("--picture", default=PICTURE_MODES[0], choices=PICTURE_MODES,
                        help="the picture in the image maps: its edges over an opaque heat (every cell keeps its "
                             "colour-bar colour), in greys under the heat, or in colour under it")
    parser.add_argument("--layers", help="layers of the small multiples, e.g. 0-3,8 (default: all)")
    parser.add_argument("--mark", action="append", metavar="ROW,COL",
                        help="outline this cell of the image maps (repeatable): where the evidence is")
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--variant", default=None, help="the series of the maps: a variant (Full, Attn, Head_h; "
                                                        "attention files Mean, Block, Head_h) or a flow (default: the first)")
    parser.add_argument("--metric", default=None, help="; ".join(
        f"{m.name} files: {', '.join(x.key for x in m.metrics)} (default {m.metrics[0].key})"
        for m in MEASURES.values()))
    parser.add_argument("--heads-layer", type=int, default=None, help="the layer of the heads figure (default: middle)")
    parser.add_argument("--normalise", default="global", choices=("layer", "step", "global"),
                        help="heatmap colours: each layer on its own, or one scale")
    parser.add_argument("--scaling", default="linear", choices=("linear", "sqrt"))
    parser.add_argument("--format", default="png", help="any of png,svg,pdf")
    parser.add_argument("--out", default="output/figures", help="output directory (made if missing)")
    parser.add_argument("--name", default=None, help="with several runs: base name of the summary (default: "
                        "aggregate, or the study directory's name)")
    return parser.parse_args(argv)


def main(argv=None, log=None, prog: str = "python -m vl_masking.figures") -> list:
    """Draw every figure; returns the paths written. Nothing is written unless everything succeeds."""
    from ..fields import layer_ranges

    log = log or (lambda line: print(line, file=sys.stderr))
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    studies = [Path(p) for p in args.files if Path(p).is_dir()]
    if studies:
        return draw_studies(studies, args, log)
    if args.group_by:
        raise UsageError("--group-by groups the examples of a study: give a study directory (--dataset's output)")
    files = []
    for pattern in args.files:
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        matches = [m for m in matches if not m.endswith(".meta.json")]
        if not matches:
            raise UsageError(f"no result files match '{pattern}'")
        files += matches
    formats = output_formats(args)
    if not files:
        raise UsageError("no result files given")
    if args.image and not Path(args.image).is_file():
        raise UsageError(f"--image {args.image}: file not found")
    wanted = None
    if args.layers:
        wanted = {x for lo, hi in layer_ranges(args.layers) for x in range(lo, hi + 1)}
    runs = distinct_runs([load(f) for f in files])
    groups = sets_to_average(runs, log)
    with Staged(Path(args.out)).writing() as staged:
        for run in runs:
            figures_of(run.result, args, formats, staged, wanted)
        scatters(runs, args, formats, staged)
        for index, (measure, group) in enumerate(groups.items()):  # with several measures, each its own name
            aggregate(group, measure, args, formats, staged, name_suffix=f"_{measure}" if index else "", log=log,
                      wanted=wanted)
        return staged.commit()


def draw_studies(directories: list, args, log) -> list:
    """Study directories: the mean over the examples of each (one panel per --group-by value) and the summary
    tables; no figure per example (a study has hundreds)."""
    if len(args.files) != len(directories):
        raise UsageError("give study directories or result files, not both")
    from ..fields import layer_ranges

    formats = output_formats(args)
    wanted = {x for lo, hi in layer_ranges(args.layers) for x in range(lo, hi + 1)} if args.layers else None
    with Staged(Path(args.out)).writing() as staged:
        for directory in directories:
            results = load_study(directory)
            by = args.group_by
            if by is not None and by not in results[0].table.columns:
                raise UsageError(f"--group-by {by}: {directory} has no column '{by}' (the table's columns are "
                                 "carried under their own names, or dataset_NAME where the measure has NAME)")
            runs = [Run(r, [r.path]) for r in results]
            name = args.name or directory.name
            aggregate(runs, results[0].measure, args, formats, staged, name_suffix="", log=log, name=name, by=by,
                      over="examples", wanted=wanted)
        return staged.commit()


def output_formats(args) -> list:
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise UsageError(f"bad --format '{args.format}' (any of png,svg,pdf)")
    return formats


def aggregate(group: list, measure: str, args, formats, staged: Staged, name_suffix: str, log, name=None, by=None,
              over: str = "prompts", wanted=None) -> None:
    """Several prompts' runs of one measure: the mean curves and the summary table; says which files went in.
    by: a column of the tables; each value its own summary rows and panel. wanted: --layers, the layers drawn."""
    first = group[0].result
    name = (name or args.name or "aggregate") + name_suffix
    if args.metric is not None and args.metric not in first.metrics and over == "examples":
        raise UsageError(f"--metric {args.metric} does not fit {Path(group[0].files[0]).parent} (use "
                         f"{', '.join(first.metrics)})")
    metric = args.metric if args.metric in first.metrics else first.schema["metrics"][0]["key"]
    steps = sorted({int(s) for run in group for s in run.result.table.generation_step.unique()})
    if args.step not in steps:
        raise UsageError(f"--step {args.step}: the {over} have steps {_layer_list(steps)}")
    layers = sorted({int(x) for run in group for x in run.result.table.layer.unique()})
    if wanted is not None and not wanted & set(layers):
        raise UsageError(f"--layers {args.layers}: the {over} have layers {_layer_list(layers)}")
    evidence = evidence_columns(args, first, over)
    every = first.curves_per_series and evidence is None
    series = None if every else (args.variant or default_series(first))
    if by is None:
        summary = summarise([run.result for run in group], args.step, series, metric, evidence)
    else:
        parts = []
        for value, members in _grouped(group, by):
            part = summarise([run.result for run in members], args.step, series, metric, evidence)
            part.insert(0, by, value)
            parts.append(part)
        summary = pd.concat(parts, ignore_index=True)
        name = f"{name}_by_{by}"
    if wanted is not None:
        summary = summary[summary.layer.isin(wanted)].reset_index(drop=True)
    summary.to_parquet(staged.path(f"{name}.summary.parquet"), index=False)
    summary.to_csv(staged.path(f"{name}.summary.csv"), index=False)
    label = first.schema["series"]["label"]
    title = (f"{first.meta.get('model', '?')} | {len(group)} {over} | step {args.step} | "
             f"{f'every {label}' if every else f'{label} {series}'} | {first.metric(metric)['label']} | "
             f"mean and {interval_words(summary.n)} over the {over}" + (f" | by {by}" if by else ""))
    save(aggregate_curves(summary, first.metric(metric), title, x_label=first.rows_label, over=over, by=by), staged,
         f"{name}_curves", formats)
    if over == "examples":
        log(f"{name}: the mean over the {len(group)} examples of {Path(group[0].files[0]).parent}")
        return
    log(f"{name}: the mean over {len(group)} {measure} runs:")
    for run in group:
        log(f"  {run.describe()}")


def figures_of(result: Result, args, formats, staged: Staged, wanted) -> None:
    metric = args.metric or result.schema["metrics"][0]["key"]
    if metric not in result.metrics:
        raise UsageError(f"--metric {metric} does not fit {result.path} (use {', '.join(result.metrics)})")
    missing = [c for c in metric_columns(result, metric) if c not in result.table.columns]
    if missing:
        raise UsageError(f"{result.path}: no column {', '.join(missing)} (the --metric {metric} reads it)")
    series_column = result.series_column
    available = [str(s) for s in result.table[series_column].unique()]
    with_units = [str(s) for s in result.table[result.table.unit_kind.astype(str) != "group"][series_column].unique()]
    series = args.variant or default_series(result)
    if series not in available:
        raise UsageError(f"{result.path}: no {series_column} '{series}' (it has {', '.join(available[:8])})")
    layers = sorted(int(x) for x in result.table.layer.unique())
    if wanted is not None and not wanted & set(layers):
        raise UsageError(f"--layers {args.layers}: {result.path} has layers {_layer_list(layers)}")
    heads_layer = None
    if result.meta.get("images") and any(head_index(v) is not None for v in available):
        heads_layer = middle_layer(result, args)
    if result.meta.get("images"):
        check_picture(result, args.image)
    fig, _, _ = heatmap(result, args.step, series, metric, args.normalise, args.scaling)
    save(fig, staged, f"{result.name}_heatmap", formats)
    if result.meta.get("images") and series in with_units:  # a group-only flow has no cells to map
        save(layer_multiples(result, args.step, series, metric, args.image, wanted, args.scaling, args.picture,
                             marks(args, result)), staged, f"{result.name}_layers", formats)
        if heads_layer is not None:
            save(heads(result, args.step, heads_layer, metric, args.image, args.scaling, args.picture), staged,
                 f"{result.name}_heads_layer{heads_layer}", formats)
    if result.curves_per_series:
        save(series_curves(result, args.step, metric), staged, f"{result.name}_{series_column}s", formats)
    if result.meta.get("videos"):  # a video's frames: a map and a curve each, of the series or the first with frames
        for name in [series, *[s for s in with_units if s != series]]:
            fig = frame_layers(result, args.step, name, metric, args.scaling)
            if fig is not None:
                save(fig, staged, f"{result.name}_frames", formats)
                break
        # and, with units inside the frames (tokens, regions), every frame's map at one layer
        fig = frame_maps(result, args.step, series, metric, middle_layer(result, args), args.scaling, args.picture) \
            if series in with_units else None
        if fig is not None:
            save(fig, staged, f"{result.name}_frame_maps", formats)


def marks(args, result: Result) -> list:
    """--mark ROW,COL cells (outlined on the image maps), each inside the first image's grid."""
    images = result.meta.get("images") or []
    image = mapped_view(images) if images else {}
    out = []
    for text in args.mark or ():
        try:
            row, col = (int(x) for x in text.split(","))
        except ValueError:
            raise UsageError(f"--mark {text}: give ROW,COL of a cell, e.g. --mark 2,3") from None
        if not (0 <= row < image.get("grid_rows", 0) and 0 <= col < image.get("grid_cols", 0)):
            raise UsageError(f"--mark {text}: outside the {image.get('grid_rows')}x{image.get('grid_cols')} grid of "
                             f"{result.path}")
        out.append((row, col))
    return out


def scatters(runs: list, args, formats, staged: Staged) -> None:
    """For the files of one run (one run id) with two measures: the scatter of the first against the others whose
    rows count the same thing (a decoder layer is not a vision block of the same number)."""
    by_run = {}
    for run in runs:
        if run.result.meta.get("run_id"):
            by_run.setdefault(run.result.meta["run_id"], []).append(run)
    for same in by_run.values():
        for other in same[1:]:
            a, b = same[0].result, other.result
            if a.rows_axis != b.rows_axis:
                continue
            layer = middle_layer(a, args)
            fig, _, _ = scatter(a, b, args.step, layer)
            save(fig, staged, f"{a.name}_vs_{b.measure}_layer{layer}", formats)



def command(argv=None, prog: str = "python -m vl_masking.figures") -> None:
    """The figures command: the paths written on stdout; bad input one line on stderr, exit 2."""
    from ..console import cli_errors

    with cli_errors():
        for path in main(argv, prog=prog):
            print(path)

