"""The Python API: one function per tool, the same options as the command line.

    from vl_masking import run_masking_experiment, run_vl_masking
    df = run_masking_experiment("The capital of France is", model_name="Qwen/Qwen3-0.6B", num_tokens=3)
    df.attrs["metadata"]["generated_text"]

Both return the result table (a pandas DataFrame, columns as in the output contract)
with the run metadata in `df.attrs["metadata"]`, and write files only when `output`
is given. The command-line tools call `run` below with their parsed settings.
"""

import time
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from . import console
from .inputs import build_text_inputs, build_vl_inputs, load_model
from .options import RunSettings, settings_from_values
from .results import write_results
from .run import Analysis, analyse


@dataclass
class RunResult:
    analysis: Analysis
    paths: dict

    @property
    def table(self) -> pd.DataFrame:
        return self.analysis.table

    @property
    def metadata(self) -> dict:
        return self.analysis.metadata


def run(settings: RunSettings, vision_language: bool, save: bool = True, progress: bool = True, log=print,
        loaded=None) -> RunResult:
    """Load (unless `loaded` is given), analyse, and write the files (when `save`)."""
    started = time.perf_counter()
    if loaded is None:
        loaded = load_model(settings, vision_language)
        log(console.describe_model(loaded))
    load_s = time.perf_counter() - started
    if vision_language:
        inputs = build_vl_inputs(loaded, settings.prompt, settings.images)
    else:
        inputs = build_text_inputs(loaded, settings.prompt, settings.chat)
    log(console.describe_inputs(inputs, settings, loaded))
    analysis = analyse(loaded, inputs, settings, progress=progress)
    analysis.metadata["timings"]["model_load_s"] = round(load_s, 4)
    paths = {}
    if save:
        paths = write_results(analysis.table, analysis.metadata, settings.output_dir, settings.output,
                              settings.formats)
    analysis.table.attrs["metadata"] = analysis.metadata
    return RunResult(analysis=analysis, paths=paths)


def _settings(kind_defaults: dict, options: dict) -> tuple:
    known = {f.name for f in fields(RunSettings)}
    unknown = set(options) - known - {"image", "prompt_file"}
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    values = {**kind_defaults, **options}
    save = values.get("output") is not None
    if not save:
        values["output"] = kind_defaults["output_name"]
    values.pop("output_name")
    for key in ("variants", "formats"):
        if isinstance(values.get(key), (list, tuple)):
            values[key] = ",".join(values[key])
    values["image"] = values.pop("images", None) or values.pop("image", None) or []
    return settings_from_values(values, base_dir=Path.cwd()), save


def run_vl_masking(prompt: str, images=(), model: str = "Qwen/Qwen3-VL-4B-Instruct", progress: bool = False,
                   **options) -> pd.DataFrame:
    """Analyse a Qwen3-VL prompt with zero or more images; returns the result table."""
    defaults = dict(model=model, num_tokens=1, mask_mode="text", vision_attention="bidirectional",
                    output_name="vl_masking_results", chat=True)
    settings, save = _settings(defaults, {"prompt": prompt, "images": list(images), **options})
    return run(settings, vision_language=True, save=save, progress=progress, log=_quiet).table


def run_masking_experiment(prompt: str, model_name: str = "Qwen/Qwen3-0.6B", device: str = "auto",
                           progress: bool = False, **options) -> pd.DataFrame:
    """Analyse a text prompt with a causal LM; returns the result table."""
    defaults = dict(model=model_name, device=device, num_tokens=1, mask_mode="text",
                    vision_attention="causal", output_name="masking_results", chat=False)
    settings, save = _settings(defaults, {"prompt": prompt, **options})
    return run(settings, vision_language=False, save=save, progress=progress, log=_quiet).table


def _quiet(*_args, **_kwargs):
    pass
