"""Command-line options shared by both tools, validated into one RunSettings.

Everything a user can get wrong is checked here, before a model is loaded (and before
torch or transformers is imported), so that a bad invocation costs one line on stderr,
exit code 2 and no file on disk. Problems that need the tokenized prompt (a span past its
end, a text span that does not occur) are found next, before the weights are read.
"""

import argparse
import json
import math
import os
import re
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path

from .errors import UsageError
from .checkpoints import gguf_source
from .fields import choices_of, flag_of, help_of, key_of, layer_ranges, no_repeats, option, shown
from .measures import MEASURES
from .tools import TOOLS, VL, Tool
from .units import SpanSpec, parse_target, parse_unit_kind, text_unit_kinds, unit_kind_names

MASK_MODES = ("text", "vision", "both")
FORMATS = ("parquet", "csv", "json")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
BUILTIN_TEMPLATE = "builtin"

CPU_BUDGET_MB, GPU_BUDGET_MB = 256, 768  # memory for one chunk of masked units when --memory-budget-mb is not given


@dataclass
class Given:
    """What an option's parse reads besides its own value: the tool, the directory paths are relative to,
    and every option value given (the prompt reads --prompt-file too)."""

    tool: Tool
    base_dir: Path
    values: dict


def _require(condition, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _check_output_name(name) -> None:
    _require(re.fullmatch(r"[A-Za-z0-9._-]+", name or "") and not name.startswith("."),
             f"--output '{shown(name)}' must be a plain file name (letters, digits, '.', '_', '-')")


def _chat_template_value(value, given: Given):
    if value in (None, "", BUILTIN_TEMPLATE):
        return value or None
    return str(_resolve(given.base_dir, value))


@dataclass
class CommonSettings:
    """The options of every run. RunSettings (below) adds each measure's own options (its Options class)."""

    model: str = option(VL.default_model, "hub id or local model directory", per_tool="default_model",
                        parse=lambda value, given: _model_path(value, given.tool))
    prompt: str = option("", "prompt text", parse=lambda value, given: _read_prompt(
        value, given.values.get("prompt_file"), given.base_dir))
    tool: str = VL.name  # which tool's run (tools.py)
    trust_remote_code: bool = option(False, "allow the model's own code to run", kind="switch")
    images: list = option([], "image file; repeat for several images in one prompt (in order)", kind="repeat",
                          metavar="PATH", flag="--image", dest="image", tools=("vl",), path=True)
    videos: list = option([], "video file (mp4, webm, gif, ...) or folder of frames in name order; repeat for several "
                          "videos (placed after the images)", kind="repeat", metavar="PATH", flag="--video",
                          dest="video", tools=("vl",), path=True)
    fps: float | None = option(None, "frames per second sampled from each --video (default: the family's video "
                               "processor's)", type=float, tools=("vl",),
                               check=lambda fps: _require(math.isfinite(fps) and fps > 0,
                                                          f"--fps must be a positive number (got {fps})"))
    max_frames: int | None = option(None, "the most frames sampled from each --video (default: the family's video "
                                    "processor's)", type=int, metavar="N", tools=("vl",),
                                    check=lambda n: _require(n >= 1, f"--max-frames must be at least 1 (got {n})"))
    system: str | None = option(None, "system prompt (placed by the chat template)", metavar="TEXT")
    chat: bool = option(VL.default_chat, "wrap the prompt in the tokenizer's chat template", kind="switch",
                        tools=("text",), per_tool="default_chat",  # VL prompts are always in the chat format
                        parse=lambda value, given: bool(value) or bool(given.values.get("chat_template")))
    chat_template: str | None = option(
        None, lambda tool: "a Jinja chat template file instead of the checkpoint's" + (
            ", or builtin: the family's built-in chat format" if tool.takes_images else " (implies --chat)"),
        metavar="FILE|builtin", parse=_chat_template_value)
    num_tokens: int = option(1, "generation steps to analyse (greedy; stops early at the end-of-turn token / EOS)",
                             type=int, check=lambda n: _require(n >= 1, f"--num-tokens must be at least 1 (got {n})"))
    mask_mode: str = option("text", "which tokens to hide: {choices}", tools=("vl",), choices=MASK_MODES)
    vision_attention: str = option(VL.default_vision_attention, "prompt attention among vision tokens: "
                                   "{choices} (causal is the model's own)", tools=("vl",),
                                   per_tool="default_vision_attention", choices=("bidirectional", "causal"))
    mask_unit: str = option("token", lambda tool: "what one knockout hides: " + ", ".join(unit_kind_names(tool.takes_images)),
                            parse=lambda value, given: str(value))
    text_unit: str | None = option(None, "text tokens' unit with image / region units: {choices} "
                                   "(default: word for image and region, else the --mask-unit)",
                                   choices=text_unit_kinds)
    mask_spans: tuple = option((), "an extra unit: positions A-B (inclusive) or text:\"some words\"; repeatable",
                               kind="repeat", metavar="SPEC", flag="--mask-span", per_row=True,
                               check=lambda specs: no_repeats(specs, SpanSpec.parse, "--mask-span"))
    measure: tuple = option(("layer",), lambda tool: "what to measure, one or several (one generation, a file "
                            "each): " + "; ".join(f"{m.name}: {m.help}" for m in MEASURES.values()), kind="csv",
                            choices=lambda: tuple(MEASURES), parse=lambda value, given: _measures(value))
    target: str = option("predicted", "the token each step is read against: predicted (the model's greedy "
                         "token), text:\"...\" (the first token of that text as it follows the prompt) or, with "
                         "--dataset, answer (each example's answer); every measure records it with its base "
                         "probability, the prediction and whether they match (correct); the flow measure reads its "
                         "probability",
                         metavar="predicted|text:\"...\"|answer", per_row=True, parse=lambda value, given: str(value).strip(),
                         check=parse_target)
    layers: str | None = option(None, "layers to analyse, e.g. 0-3,30 (default: all)",  # resolved once loaded
                                check=lambda spec: layer_ranges(str(spec)))
    device: str = option("auto", "auto, cpu, cuda or cuda:N", check=lambda device: _check_device(device))
    device_map: str | None = option(None, "let accelerate place the layers ("
                                    f"{', '.join(DEVICE_MAP_STRATEGIES)}, or a JSON file of module -> device) for "
                                    "models larger than one GPU", metavar="MAP")
    dtype: str = option("auto", "{choices}", choices=("auto", "bfloat16", "float16", "float32"))
    output: str = option(VL.default_output, "base name of the output files", per_tool="default_output",
                         check=_check_output_name)
    output_dir: str = option("output", "directory for the output files", path=True)
    formats: tuple = option(FORMATS, "any of {choices}", kind="csv", choices=FORMATS)
    check: int = option(0, "recompute K distinct random results with the reference method (all of them where there "
                        "are fewer)", type=int, metavar="K",
                        check=lambda k: _require(k >= 0, f"--check must be 0 or more (got {k})"))
    memory_budget_mb: float | None = option(
        None, f"memory for one chunk of masked units (default: {CPU_BUDGET_MB} on a CPU, {GPU_BUDGET_MB} on a GPU; "
        "at most half the free GPU memory)", type=float, metavar="MB",
        check=lambda mb: _require(math.isfinite(mb) and mb > 0,
                                  "--memory-budget-mb must be a positive finite number of megabytes"))
    max_image_pixels: int | None = option(None, "refuse larger images (default: Pillow's 89,478,485; raise it for "
                                          "large scans)", type=int, metavar="N", tools=("vl",),
                                          check=lambda n: _require(n > 0, "--max-image-pixels must be positive"))

    def __post_init__(self):
        if isinstance(self.measure, str):  # measure="flow" from code that builds settings directly
            self.measure = tuple(m.strip() for m in self.measure.split(","))
        for name in self.measure:
            if name in MEASURES:
                MEASURES[name].settle(vars(self))


@dataclass
class BatchOptions:
    """The options of a batch (--config) or a study (--dataset): how prompts are found, not how each runs."""

    config: str | None = option(None, "run every prompt of a config file (other options given here override the "
                                "file)", metavar="YAML", group="batch runs")
    resume: bool = option(False, "with --config or --dataset: skip prompts already done with the same settings",
                          kind="switch", group="batch runs", needs=("config", "dataset"))
    dataset: str | None = option(None, "run every example of a .csv, .jsonl or .parquet table, or of a datasets "
                                 "save_to_disk directory, into one study directory", metavar="TABLE", group="datasets")
    columns: str | None = option(None, lambda tool: "the table's columns: id=COL,question=COL,answer=COL" + (
        ",image=COL (a path relative to the table, or the picture's bytes),video=COL (a video file or a folder of "
        "frames, relative to the table)" if tool.takes_images else ""),
        metavar="MAP", group="datasets", needs=("dataset",))
    prompt_template: str | None = option(None, "the prompt from the row: {question} or any column as {name} "
                                         "(default: the question column)", metavar="TEXT", group="datasets",
                                         needs=("dataset",))
    where: str | None = option(None, "keep the rows for which this filter is true: columns compared with values "
                               "(== != < <= > >= in [...], not in [...]), COLUMN.str.startswith|endswith|contains"
                               "('text'), COLUMN.isna(), joined by and, or, not; `a column` in backticks. Parsed, "
                               "never run as code", metavar="FILTER", group="datasets", needs=("dataset",))
    sample: int | None = option(None, "draw N of the rows (seeded by --seed)", type=int, metavar="N",
                                group="datasets", needs=("dataset",))
    seed: int = option(0, "the seed of --sample", type=int, group="datasets")
    limit: int | None = option(None, "run the first N rows (after --where and --sample)", type=int, metavar="N",
                               group="datasets", needs=("dataset",))
    only_correct: bool | None = option(None, "keep the examples whose greedy first token is the --target's first "
                                       "token (--target answer: those the model answers right); the others are "
                                       "listed as excluded", kind="switch", group="datasets", needs=("dataset",))


GROUPS = {"batch runs": "batch runs",
          "datasets": "datasets (a study: every example through one model, into one directory)"}
BATCH_KEYS = tuple(f.name for f in fields(BatchOptions))


def _measure_field(f, measure: str):
    """A measure's option as a RunSettings field: the same default and metadata, plus its measure."""
    meta = {**f.metadata, "measure": measure}
    if f.default_factory is not MISSING:
        return field(default_factory=f.default_factory, metadata=meta)
    return field(default=f.default, metadata=meta)


def settings_class(common=None):
    """The class of a run's settings: the common options' dataclass plus every registered measure's Options.
    Every reader of options (the parser, collect_settings, configs, the API) reads this module's RunSettings
    fields, so a field added to CommonSettings (or a measure's Options) is the only edit an option needs."""
    measure_fields = [(f.name, f.type, _measure_field(f, m.name))
                      for m in MEASURES.values() if m.Options for f in fields(m.Options)]
    return make_dataclass("RunSettings", measure_fields, bases=(common or CommonSettings,), namespace={
        "to_dict": lambda self: asdict(self), "__module__": __name__,
        "__doc__": """Everything one run needs, after validation. Each field's default, help, choices and check
    are stated once, on its field (CommonSettings or its measure's Options); the parser (build_parser), the
    config keys (batch_config) and the API's keywords are made from them. The defaults are the VL tool's;
    per_tool options take each tool's own."""})


RunSettings = settings_class()


def option_fields() -> list:
    """The RunSettings fields that are options, in --help order."""
    return [f for f in fields(RunSettings) if "kind" in f.metadata]


def measure_classes(s) -> list:
    """The classes of the measures a run asks for, in the order given."""
    return [MEASURES[name] for name in s.measure]


def option_default(f, tool: Tool):
    """One option's default for one tool, as the command line gives it (csv choices as text)."""
    meta = f.metadata
    value = getattr(tool, meta["per_tool"]) if meta["per_tool"] else (
        f.default_factory() if f.default_factory is not MISSING else f.default)
    if meta["kind"] == "csv":
        return ",".join(value)
    if meta["kind"] == "repeat":
        return list(value)
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we promise one line."""

    def error(self, message):
        raise UsageError(message)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where there is none (the help says what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser(tool: Tool, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of one tool, made from the RunSettings and BatchOptions fields; its defaults are the
    tool's defaults everywhere (API, configs)."""
    parser = _OneLineParser(
        prog=prog or tool.script,
        description=("For every generation step, decoder layer and prompt unit (token, word, image region, span), "
                     "measure what the unit does: " + "; ".join(f"{m.name}: {m.help}" for m in MEASURES.values())
                     + "."),
        formatter_class=_DefaultsHelp)
    prompt = parser.add_mutually_exclusive_group()
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in [*option_fields(), *fields(BatchOptions)]:
        meta = f.metadata
        default, dest = option_default(f, tool), key_of(f)
        if tool.name not in meta["tools"]:
            parser.set_defaults(**{dest: default})  # no flag here: the option keeps its default
            continue
        where = prompt if f.name == "prompt" else groups.get(meta["group"], parser)
        help = help_of(f, tool)
        if meta["kind"] == "switch":
            where.add_argument(flag_of(f), action="store_true", dest=dest, help=help)
            parser.set_defaults(**{dest: default})
        elif meta["kind"] == "repeat":
            where.add_argument(flag_of(f), action="append", default=default, metavar=meta["metavar"], dest=dest,
                               help=help)
        else:  # the prompt's default is none given: --prompt-file or ./prompt.txt then
            where.add_argument(flag_of(f), default=None if f.name == "prompt" else default, metavar=meta["metavar"],
                               type=None if meta["type"] is str else meta["type"], dest=dest, help=help)
        if f.name == "prompt":
            prompt.add_argument("--prompt-file", metavar="PATH", help="file holding the prompt (default: ./prompt.txt)")
    parser.set_defaults(tool=tool.name)
    return parser


def tool_defaults(tool: Tool) -> dict:
    """Every option's default for one tool, including those it has no flag for."""
    values = vars(build_parser(tool).parse_args([]))
    for key in BATCH_KEYS:
        values.pop(key)
    return values


def explicit_options(parser, argv) -> dict:
    """Only the options the command line actually gave (a parse without defaults)."""
    saved = {a.dest: a.default for a in parser._actions}
    saved_defaults, parser._defaults = parser._defaults, {}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given = vars(parser.parse_args(argv))
    finally:
        parser._defaults = saved_defaults
        for action in parser._actions:
            action.default = saved[action.dest]
    return {k: v for k, v in given.items() if k not in BATCH_KEYS}


def settings_from_values(values: dict, base_dir: Path) -> RunSettings:
    """Validate option values (CLI or API) into RunSettings; UsageError on the first problem."""
    settings, problems = collect_settings(values, base_dir)
    if problems:
        raise UsageError(problems[0][1])
    return settings


def collect_settings(values: dict, base_dir: Path, image_check=None) -> tuple:
    """(RunSettings, [(option, message), ...]): every problem found, not just the first.

    Each field is read from its value as its metadata says (option_value), so a field added to the settings
    is filled with no other edit. A config file reports all its mistakes at once, so each check runs on its
    own. image_check defaults to check_image (the file decodes); a batch only asks that the file exists and
    leaves decoding to run time, where a bad image fails one prompt.
    """
    problems = []

    def attempt(key, check, fallback=None):
        try:
            return check()
        except UsageError as exc:
            problems.append((key, str(exc)))
            return fallback

    tool = TOOLS[values.get("tool") or "vl"]
    values = {**tool_defaults(tool), **values}  # what is not given takes the tool's default (stated in RunSettings)
    given = Given(tool, base_dir, values)
    measure = attempt("measure", lambda: _measures(values["measure"]), ("layer",))
    for name in measure:
        MEASURES[name].settle(values)
    read = {"measure": measure}
    for f in option_fields():
        if f.name not in read:
            read[f.name] = attempt(f.name, lambda f=f: option_value(f, values.get(key_of(f)), given),
                                   _typed(f, option_default(f, tool), given))
    settings = RunSettings(tool=tool.name, **read)
    for key, check in _checks(settings, tool, image_check or check_image):
        attempt(key, check)
    return settings, problems


def option_value(f, value, given: Given):
    """One option's settings value from what the command line, a config or the API gave, by its metadata."""
    meta = f.metadata
    if meta["parse"] is not None:
        return meta["parse"](value, given)
    if meta["kind"] == "csv":
        return _split_choices(value, choices_of(f), flag_of(f))
    return _typed(f, value, given)


def _typed(f, value, given: Given):
    """A value as the settings hold it: a switch a bool, a repeated option a list or tuple, a path resolved,
    an empty optional text None."""
    meta = f.metadata
    if meta["kind"] == "switch":
        return bool(value)
    if meta["kind"] == "csv" and isinstance(value, str):
        return tuple(v.strip() for v in value.split(","))
    if meta["kind"] == "repeat":
        items = [str(_resolve(given.base_dir, v)) if meta["path"] else v for v in value or ()]
        return items if f.default_factory is not MISSING else tuple(items)
    if value in (None, "") and f.default is None:
        return None
    return str(_resolve(given.base_dir, value)) if meta["path"] else value


def _checks(s: RunSettings, tool: Tool, image_check) -> list:
    """(option, check) pairs; each check raises UsageError. First each option on its own (its choices and its
    metadata's check), then what one option asks of another."""
    def require(condition, message):
        return lambda: _require(condition, message)

    def own(f):
        value = getattr(s, f.name)
        if value is None or f.metadata["kind"] in ("csv", "switch") or f.metadata["parse"] is not None \
                and f.metadata["check"] is None:
            return []
        choices, check = choices_of(f), f.metadata["check"]
        found = [] if not choices else [(f.name, require(value in choices, f"unknown {flag_of(f)} '{shown(value)}' "
                                                                         f"(choose from {', '.join(choices)})"))]
        return found + ([(f.name, lambda: check(value))] if check else [])

    return [
        *[check for f in option_fields() for check in own(f)],
        ("image", require(s.mask_mode != "vision" or s.images or s.videos,
                          "--mask-mode vision needs at least one --image or --video")),
        *[(name, require(getattr(s, name) is None or s.videos, f"{flag(name)} needs --video"))
          for name in ("fps", "max_frames")],
        ("mask_unit", lambda: _check_units(s, tool)),
        *_measure_options_checks(s),
        *[check for m in measure_classes(s) for check in m.checks(s)],
        ("chat_template", lambda: _check_chat_template(s.chat_template, tool)),
        ("device_map", lambda: _check_device_map(s.device_map, s.device)),
        *[("image", lambda path=path: image_check(path, s.max_image_pixels)) for path in s.images],
        *[("video", lambda path=path: video_check(path, s.max_image_pixels)) for path in s.videos],
        ("output_dir", lambda: check_output_dir(s.output_dir)),
        *[("output", lambda name=name: check_targets(s.output_dir, name, s.formats))
          for name in output_names(s).values()],
    ]


def _check_chat_template(template: str | None, tool: Tool) -> None:
    if template is None:
        return
    if template == BUILTIN_TEMPLATE:
        if not tool.takes_images:
            raise UsageError("--chat-template builtin: the text tool has no built-in chat format (give a file)")
        return
    if not Path(template).is_file():
        raise UsageError(f"--chat-template {template}: file not found (give a Jinja file or builtin)")
    try:
        Path(template).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--chat-template {template}: not UTF-8 text (byte {exc.start}): give a Jinja file") \
            from None
    except OSError as exc:
        raise UsageError(f"--chat-template {template}: cannot be read ({exc.strerror})") from None


def _check_units(s: RunSettings, tool: Tool) -> None:
    kind = parse_unit_kind(s.mask_unit)
    if kind.covers == ("vision",):
        if not tool.takes_images:
            raise UsageError(f"--mask-unit {s.mask_unit}: {tool.script} has no images (use token or word)")
        if not s.images and not s.videos:
            raise UsageError(f"--mask-unit {s.mask_unit} needs at least one --image or --video")
        if s.mask_mode == "text":
            raise UsageError(f"--mask-unit {s.mask_unit} hides image tokens, which --mask-mode text leaves out: "
                             "add --mask-mode vision or both")


def _measure_options_checks(s: RunSettings) -> list:
    """A measure's own option that must not be given without it (a flow without the flow measure)."""
    def refuse(f):
        def check():
            raise UsageError(f"{flag(f.name)} needs --measure {f.metadata['measure']}")
        return check

    return [(f.name, refuse(f)) for f in option_fields()
            if f.metadata.get("measure") not in (None, *s.measure) and f.metadata["without"] == "refuse"
            and _given(s, f)]


def _given(s: RunSettings, f) -> bool:
    """Whether a run's option differs from its default."""
    value, default = getattr(s, f.name), option_default(f, TOOLS[s.tool])
    if f.metadata["kind"] == "csv":
        return ",".join(value) != default
    if f.metadata["kind"] == "repeat":
        return tuple(value) != tuple(default)
    return value != default


def unused_options(s: RunSettings, given) -> list:
    """Warnings for options given that this run does not use (they are accepted, and would otherwise
    look as if they had changed the result): a measure's own option without that measure, and an option
    that none of the run's measures uses (each measure says why it ignores it)."""
    lines, owners = [], {f.name: f.metadata.get("measure") for f in option_fields()}
    run = ",".join(s.measure)
    for key in (k for k in owners if k in set(given)):
        owner = owners[key]
        if owner is not None:
            users = [owner, *(m.name for m in MEASURES.values() if key in m.uses)]  # its measure, and those reading it
            if not set(users) & set(s.measure):
                lines.append(f"{flag(key)} is used by --measure {' or '.join(users)} only; ignored with --measure {run}")
            continue
        reasons = [m.ignores(s, key) for m in measure_classes(s)]
        if reasons and all(reasons):
            lines.append(f"{flag(key)} {reasons[0]}; ignored")
    return [f"warning: {line}" for line in lines]


def flag(key: str) -> str:
    """The command-line flag of a settings key (mask_spans -> --mask-span)."""
    named = {f.name: f for f in [*option_fields(), *fields(BatchOptions)]}
    return flag_of(named[key]) if key in named else "--" + key.replace("_", "-")


def video_check(path: str, max_pixels: int | None = None) -> None:
    """A video (file or folder of frames) that can be read and holds frames, or UsageError."""
    from .video import probe

    if not os.path.exists(path):
        raise UsageError(f"video not found: {path}")
    probe(path, max_pixels)


def check_image(path: str, max_pixels: int | None = None) -> None:
    """An image the processor can read, or UsageError (missing, not an image, too large, too elongated)."""
    from PIL import UnidentifiedImageError

    from .pictures import sized_image

    if not os.path.isfile(path):
        raise UsageError(f"image not found: {path}")
    try:
        with sized_image(path, max_pixels) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"not a readable image: {path} ({type(exc).__name__})") from None


def check_output_dir(path: str) -> None:
    """The directory exists and takes files, or can be created; leaves nothing behind."""
    p = Path(path)
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"output directory is not writable: {path} ({probe} is not a directory)")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(f"output directory is not writable: {path} ({exc.strerror})") from None


def output_paths(output_dir, name, formats) -> dict:
    """{format: path} of one run's files; a CSV brings NAME.meta.json (key "meta")."""
    base = Path(output_dir)
    paths = {}
    for fmt in formats:
        paths[fmt] = base / f"{name}.{fmt}"
        if fmt == "csv":
            paths["meta"] = base / f"{name}.meta.json"
    return paths


def output_names(s) -> dict:
    """{measure: base name} of a run's files: NAME for one measure, NAME.MEASURE for each of several."""
    if len(s.measure) == 1:
        return {s.measure[0]: s.output}
    return {m: f"{s.output}.{m}" for m in s.measure}


def check_targets(output_dir: str, name: str, formats) -> None:
    """No output file may be a directory (it could never be replaced, and half a set would be written)."""
    for path in output_paths(output_dir, name, formats).values():
        if Path(path).is_dir():
            raise UsageError(f"cannot write {path}: a directory of that name exists")


def cuda_devices() -> int:
    """How many CUDA devices there are; 0 without asking torch when no NVIDIA driver is present."""
    if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg")):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        raise UsageError(f"unknown --device '{shown(device)}' (auto, cpu, cuda or cuda:N)")
    count = cuda_devices()
    if not count:
        raise UsageError(f"--device {device} requested but CUDA is not available on this machine")
    if m.group(1) is not None and int(m.group(1)) >= count:
        raise UsageError(f"--device {device}: only {count} CUDA device(s) present")


def _check_device_map(device_map, device: str) -> None:
    if device_map is None:
        return
    if device != "auto":
        raise UsageError("--device-map places the model itself: leave --device at auto")
    if device_map in DEVICE_MAP_STRATEGIES:
        return
    path = Path(device_map)
    if path.suffix != ".json" or not path.is_file():
        raise UsageError(f"--device-map '{shown(device_map)}': use {', '.join(DEVICE_MAP_STRATEGIES)} or an "
                         "existing JSON file")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--device-map {device_map}: not a JSON object of module name -> device ({exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(f"--device-map {device_map}: not a JSON object of module name -> device")
    for module, where in mapping.items():
        _check_placement(device_map, module, where)


def _check_placement(map_path, module: str, where) -> None:
    where_text = str(where)
    if isinstance(where, bool) or not isinstance(where, (int, str)):
        raise UsageError(f"--device-map {map_path}: module '{shown(module)}' -> {shown(where_text)} is not a device")
    if where in ("cpu", "disk", "meta"):
        return
    m = re.fullmatch(r"(?:cuda:)?(\d+)|cuda", where_text)
    if not m:
        raise UsageError(f"--device-map {map_path}: module '{shown(module)}' -> '{shown(where_text)}' is not a "
                         "device (cpu, disk, cuda, cuda:N or a GPU number)")
    count = cuda_devices()
    index = int(m.group(1)) if m.group(1) is not None else 0
    if index >= count:
        have = f"only {count} CUDA device(s) present" if count else "CUDA is not available on this machine"
        raise UsageError(f"--device-map {map_path}: module '{shown(module)}' -> '{where_text}', but {have}")


def _model_path(model: str, tool: Tool) -> str:
    """A local directory, a GGUF file (or a directory holding one), or a hub id 'owner/name'; anything else
    that looks like a path must exist."""
    expanded = os.path.expanduser(model)
    if expanded.lower().endswith(".gguf") or os.path.isdir(expanded):
        gguf = gguf_source(expanded)
        if gguf is not None and tool.takes_images:
            raise UsageError(f"--model {shown(model)} is a GGUF checkpoint: transformers reads GGUF text models "
                             f"only (use mask_impact_analysis.py)")
        if gguf is not None or os.path.isdir(expanded):
            return expanded
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not model.startswith(".")
    if not looks_like_hub_id or os.path.exists(expanded):
        raise UsageError(f"model directory not found: {shown(model)}")
    return model


def _read_prompt(prompt, prompt_file, base_dir: Path) -> str:
    if prompt is None:
        path = _resolve(base_dir, prompt_file or "prompt.txt")
        if not path.is_file():
            raise UsageError(f"prompt file not found: {path} (give --prompt or --prompt-file)")
        prompt = read_text_file(path, "prompt file")
    prompt = prompt.strip()
    if not prompt:
        raise UsageError("the prompt is empty")
    return prompt


def read_text_file(path: Path, what: str) -> str:
    """UTF-8 text, or UsageError naming the file and the first bad byte."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") \
            from None
    if "\x00" in text:
        raise UsageError(f"{what} {path} is not text (a NUL byte at offset {text.index(chr(0))})")
    return text


def _measures(value) -> tuple:
    """--measure: names of registered measures, comma-separated, in the order given (each once)."""
    items = tuple(dict.fromkeys(v.strip() for v in str(value).split(",") if v.strip()))
    bad = [v for v in items if v not in MEASURES]
    if bad or not items:
        raise UsageError(f"unknown --measure '{shown(value)}' (any of {', '.join(MEASURES)}, or several "
                         "comma-separated)")
    return items


def _split_choices(value: str, allowed, flag: str) -> tuple:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UsageError(f"bad {flag} '{shown(value)}' (any of {','.join(allowed)})")
    return tuple(v for v in allowed if v in items)


def _resolve(base_dir: Path, path) -> Path:
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else base_dir / p
