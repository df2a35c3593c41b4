"""The Python API: one function per tool, the same keyword options as the command line.

    from vl_masking import run_masking_experiment, run_vl_masking
    df = run_masking_experiment("The capital of France is", model="Qwen/Qwen3-0.6B", num_tokens=3)
    df.attrs["metadata"]["generated_text"]

Both return the result table (a pandas DataFrame, columns as in the output contract)
with the run metadata in `df.attrs["metadata"]`, and write files only when `output`
is given. With several measures (measure="layer,attention") they return a dict
{measure: DataFrame}, all from one generation. The command-line tools call `run` below with their parsed settings.
"""

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import console
from .analysis import Analysis, analyse_measures
from .inputs import LoadedModel, PromptInputs, build_inputs, load_model, load_weights
from .fields import item_key, key_of
from .fields import parse_layers
from .options import (RunSettings, measure_classes, option_fields, output_names, settings_from_values, tool_defaults,
                      unused_options)
from .results import write_result_sets
from .tools import TEXT, TOOLS, VL, Tool
from .units import MaskPlan, build_plan


@dataclass
class RunResult:
    analyses: list  # one Analysis per measure, in the order of settings.measure
    paths: dict  # {format: path}; with several measures {"MEASURE.FORMAT": path}

    @property
    def analysis(self) -> Analysis:
        return self.analyses[0]

    @property
    def table(self) -> pd.DataFrame:
        return self.analysis.table

    @property
    def metadata(self) -> dict:
        return self.analysis.metadata

    @property
    def tables(self) -> dict:
        return {a.measure.name: a.table for a in self.analyses}


def prepare(loaded: LoadedModel, settings: RunSettings) -> tuple[PromptInputs, MaskPlan]:
    """The prompt as model inputs with its token map, and the mask plan; UsageError for what does not fit."""
    parse_layers(settings.layers, loaded.text_config.num_hidden_layers)  # bounds, before anything is expanded
    for measure in measure_classes(settings):
        measure.check_model(loaded, settings)
    inputs = build_inputs(loaded, settings)
    plan = build_plan(inputs.tokens, settings)
    for measure in measure_classes(settings):
        measure.check_plan(plan, settings)
    return inputs, plan


def run(settings: RunSettings, save: bool = True, progress: bool = True, log=print, loaded=None,
        warn=None, only_correct: bool = False) -> RunResult:
    """Load (unless `loaded` is given), check the prompt, analyse, and write the files (when `save`).
    only_correct: analysis.Excluded when the greedy first token is not the target's (a study's --only-correct).

    Everything about the prompt (images, spans, flow groups) is checked before the weights are read.
    """
    started = time.perf_counter()
    console.files_written({})  # a Ctrl-C from here on interrupts this run, whatever an earlier one wrote
    if loaded is None:
        loaded = load_model(settings, weights=False)
    inputs, plan = prepare(loaded, settings)
    if loaded.model is None:
        load_weights(loaded, settings)
        log(console.describe_model(loaded))
    load_s = time.perf_counter() - started
    for warning in inputs.warnings:
        (warn or _stderr)(warning)
    lines = [line for m in measure_classes(settings) if (line := m.describe(settings, plan, loaded))]
    log(console.describe_inputs(inputs, plan, settings, lines))
    analyses = analyse_measures(loaded, inputs, plan, settings, progress=progress, only_correct=only_correct)
    names = output_names(settings)
    paths = {}
    for analysis in analyses:
        analysis.metadata["timings"]["model_load_s"] = round(load_s, 4)
        if analysis.metadata["non_finite"]:
            (warn or _stderr)(console.non_finite_warning(analysis.metadata["non_finite"], loaded.dtype))
        analysis.table.attrs["metadata"] = analysis.metadata
    if save:
        sets = [(a.table, a.metadata, names[a.measure.name]) for a in analyses]
        several = len(analyses) > 1

        def committed(written: list) -> None:  # inside the renames' signal-held block
            for analysis, files in zip(analyses, written):
                paths.update({(f"{analysis.measure.name}.{fmt}" if several else fmt): p for fmt, p in files.items()})
            console.files_written(paths)

        write_result_sets(sets, settings.output_dir, settings.formats, on_commit=committed)
    return RunResult(analyses=analyses, paths=paths)


def _settings(tool: Tool, options: dict) -> tuple:
    values = {**tool_defaults(tool), **_option_values(options)}
    save = options.get("output") is not None
    if not save:
        values["output"] = tool.default_output
    return settings_from_values(values, base_dir=Path.cwd()), save


def _option_values(options: dict) -> dict:
    """Keyword options as the command line gives them (csv options as text, repeatable ones as lists)."""
    names = {name: key_of(f) for f in option_fields() for name in (f.name, key_of(f), item_key(f))}
    unknown = set(options) - set(names) - {"prompt_file"}
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    # images=[...] or image="a.png" (the field's name or one item's) is given to the parser as image=[...]
    values = {names.get(k, k): v for k, v in options.items()}
    for key in (f.name for f in option_fields() if f.metadata["kind"] == "csv"):
        if isinstance(values.get(key), (list, tuple)):
            values[key] = ",".join(values[key])
    for key in (key_of(f) for f in option_fields() if f.metadata["kind"] == "repeat"):
        if isinstance(values.get(key), (str, Path)):
            values[key] = [values[key]]
        elif values.get(key) is not None:
            values[key] = [str(v) for v in values[key]]
    return values


def _api(tool: Tool, prompt: str, options: dict, progress: bool) -> pd.DataFrame:
    settings, save = _settings(tool, {"prompt": prompt, **options})
    for line in unused_options(settings, {f.name for f in option_fields()
                                          if {f.name, key_of(f), item_key(f)} & set(options)}):
        _warn(line)
    result = run(settings, save=save, progress=progress, log=_quiet, warn=_warn)
    return result.table if len(result.analyses) == 1 else result.tables


def run_vl_masking(prompt: str, images=(), model: str = VL.default_model, progress: bool = False,
                   **options) -> pd.DataFrame:
    """Analyse a vision-language model's prompt with zero or more images; returns the result table."""
    return _api(VL, prompt, {"images": list(images), "model": model, **options}, progress)


def run_masking_experiment(prompt: str, model: str = TEXT.default_model, progress: bool = False,
                           **options) -> pd.DataFrame:
    """Analyse a text prompt with a causal LM; returns the result table."""
    if "model_name" in options:
        warnings.warn("run_masking_experiment(model_name=...) is deprecated: use model=...", DeprecationWarning,
                      stacklevel=2)
        model = options.pop("model_name")
    return _api(TEXT, prompt, {"model": model, **options}, progress)


def _quiet(*_args, **_kwargs):
    pass


def _warn(text: str) -> None:
    warnings.warn(text.removeprefix("warning: "), UserWarning, stacklevel=4)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


__all__ = ["run", "prepare", "run_vl_masking", "run_masking_experiment", "RunResult", "TOOLS"]
