"""Command-line options shared by both entry points, validated into one RunSettings.

Everything a user can get wrong is checked here, before a model is loaded, so that a
bad invocation costs one line on stderr, exit code 2 and no file on disk.
"""

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

MASK_MODES = ("text", "vision", "both")
VISION_ATTENTION_MODES = ("bidirectional", "causal")
VARIANT_GROUPS = ("Full", "Attn", "Heads")
FORMATS = ("parquet", "csv", "json")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we promise one line."""

    def error(self, message):
        raise UsageError(message)


@dataclass
class RunSettings:
    """Everything one run needs, after validation."""

    model: str
    prompt: str
    images: list = field(default_factory=list)
    num_tokens: int = 1
    mask_mode: str = "text"
    vision_attention: str = "bidirectional"
    layers: str | None = None  # resolved against the model's layer count once it is loaded
    variants: tuple = VARIANT_GROUPS
    device: str = "auto"
    device_map: str | None = None  # accelerate placement (auto, balanced, sequential or a JSON file)
    dtype: str = "auto"
    output: str = "vl_masking_results"
    output_dir: str = "output"
    formats: tuple = FORMATS
    check: int = 0
    trust_remote_code: bool = False
    chat: bool = True  # VL prompts always use the chat format; the text tool makes it optional
    memory_budget_mb: float | None = None  # None: 256 on a CPU, 768 on a GPU (fewer, larger chunks)

    def to_dict(self) -> dict:
        return asdict(self)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where there is none (the help says what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser(kind: str) -> argparse.ArgumentParser:
    """The argument parser of `mask_impact_vl.py` (kind 'vl') or `mask_impact_analysis.py` (kind 'text')."""
    vl = kind == "vl"
    parser = _OneLineParser(
        description=("Mask each prompt token from attention, layer by layer, and measure how far the "
                     "layer's update at the last position moves."),
        formatter_class=_DefaultsHelp)
    parser.add_argument("--model", default="Qwen/Qwen3-VL-4B-Instruct" if vl else "Qwen/Qwen3-0.6B",
                        help="hub id or local model directory")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    if vl:
        parser.add_argument("--image", action="append", default=[], metavar="PATH",
                            help="image file; repeat for several images in one prompt (in order)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", metavar="PATH", help="file holding the prompt (default: ./prompt.txt)")
    if not vl:
        parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--num-tokens", type=int, default=1,
                        help="generation steps to analyse (greedy; stops early at <|im_end|> / EOS)")
    if vl:
        parser.add_argument("--mask-mode", default="text", help="which tokens to mask: text, vision or both")
        parser.add_argument("--vision-attention", default="bidirectional",
                            help="prompt attention among vision tokens: bidirectional or causal (model-native)")
    parser.add_argument("--layers", help="layers to analyse, e.g. 0-3,30 (default: all)")
    parser.add_argument("--variants", default="Full,Attn,Heads", help="any of Full,Attn,Heads")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--device-map", metavar="MAP",
                        help="let accelerate place the layers (auto, balanced, sequential, or a JSON file of "
                             "module -> device) for models larger than one GPU")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--output", default="vl_masking_results" if vl else "masking_results",
                        help="base name of the output files")
    parser.add_argument("--output-dir", default="output", help="directory for the output files")
    parser.add_argument("--formats", default="parquet,csv,json", help="any of parquet,csv,json")
    parser.add_argument("--check", type=int, default=0, metavar="K",
                        help="recompute K random (step, layer, position) triples with the reference method")
    parser.add_argument("--memory-budget-mb", type=float, metavar="MB",
                        help="memory for one chunk of masked positions in the batched re-attention "
                             "(default: 256 on a CPU, 768 on a GPU; at most half the free GPU memory)")
    batch = parser.add_argument_group("batch runs")
    batch.add_argument("--config", metavar="YAML",
                       help="run every prompt of a config file (other options given here override the file)")
    batch.add_argument("--resume", action="store_true",
                       help="with --config: skip prompts already done with the same settings")
    return parser


@dataclass
class CommandLine:
    """What a command line asks for: one run (settings) or a batch from a config file."""

    settings: RunSettings | None = None
    batch: object | None = None  # batch_config.BatchConfig
    resume: bool = False


def parse_command_line(argv, kind: str) -> CommandLine:
    """Parse and validate a command line; with --config, the whole config file (every problem at once)."""
    parser = build_parser(kind)
    args = parser.parse_args(argv)
    if args.config is None:
        if args.resume:
            raise UsageError("--resume needs --config (it resumes a batch)")
        return CommandLine(settings=_settings_from_args(args))
    from .batch_config import load_batch

    given = explicit_options(parser, argv)
    for key in ("prompt", "prompt_file", "image", "output"):
        if key in given:
            raise UsageError(f"--{key.replace('_', '-')} cannot be combined with --config "
                             "(prompts, images and names come from the file)")
    for key in ("output_dir", "device_map"):
        if key in given and not (key == "device_map" and given[key] in DEVICE_MAP_STRATEGIES):
            given[key] = str(_resolve(Path.cwd(), given[key]))
    return CommandLine(batch=load_batch(args.config, kind, overrides=given), resume=args.resume)


def parse_settings(argv, kind: str) -> RunSettings:
    """Parse and validate a single-run command line; raise UsageError on the first problem."""
    return _settings_from_args(build_parser(kind).parse_args(argv))


def kind_defaults(kind: str) -> dict:
    """Every option's default for one tool, including those the tool has no flag for."""
    values = vars(build_parser(kind).parse_args([]))
    return _complete(values)


def explicit_options(parser, argv) -> dict:
    """Only the options the command line actually gave (a parse without defaults)."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given = vars(parser.parse_args(argv))
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return {k: v for k, v in given.items() if k not in ("config", "resume")}


def _complete(values: dict) -> dict:
    values.setdefault("image", [])
    values.setdefault("mask_mode", "text")
    values.setdefault("vision_attention", "causal")
    values.setdefault("chat", True)
    return values


def _settings_from_args(args) -> RunSettings:
    values = _complete(vars(args))
    return settings_from_values(values, base_dir=Path.cwd())


def settings_from_values(values: dict, base_dir: Path) -> RunSettings:
    """Validate option values (CLI or API) into RunSettings; UsageError on the first problem."""
    settings, problems = collect_settings(values, base_dir)
    if problems:
        raise UsageError(problems[0][1])
    return settings


def collect_settings(values: dict, base_dir: Path, image_check=None) -> tuple:
    """(RunSettings, [(option, message), ...]): every problem found, not just the first.

    A config file reports all its mistakes at once, so each check runs on its own.
    image_check defaults to check_image (the file decodes); a batch only asks that the
    file exists and leaves decoding to run time, where a bad image fails one prompt.
    """
    problems = []

    def attempt(key, check, fallback=None):
        try:
            return check()
        except UsageError as exc:
            problems.append((key, str(exc)))
            return fallback

    image_check = image_check or check_image
    images = [str(_resolve(base_dir, p)) for p in values.get("image") or []]
    settings = RunSettings(
        model=attempt("model", lambda: _model_path(values["model"]), values["model"]),
        prompt=attempt("prompt", lambda: _read_prompt(values.get("prompt"), values.get("prompt_file"), base_dir), ""),
        images=images,
        num_tokens=values["num_tokens"],
        mask_mode=values["mask_mode"],
        vision_attention=values["vision_attention"],
        layers=values.get("layers"),
        variants=attempt("variants", lambda: _split_choices(values.get("variants") or "Full,Attn,Heads",
                                                            VARIANT_GROUPS, "--variants"), VARIANT_GROUPS),
        device=values.get("device") or "auto",
        device_map=values.get("device_map"),
        dtype=values.get("dtype") or "auto",
        output=values["output"],
        output_dir=str(_resolve(base_dir, values.get("output_dir") or "output")),
        formats=attempt("formats", lambda: _split_choices(values.get("formats") or "parquet,csv,json", FORMATS,
                                                          "--formats"), FORMATS),
        check=values.get("check") or 0,
        trust_remote_code=bool(values.get("trust_remote_code")),
        chat=bool(values.get("chat", True)),
        memory_budget_mb=values.get("memory_budget_mb"),
    )
    for key, check in _checks(settings, image_check):
        attempt(key, check)
    return settings, problems


def _checks(s: RunSettings, image_check) -> list:
    """(option, check) pairs; each check raises UsageError."""
    def require(condition, message):
        def check():
            if not condition:
                raise UsageError(message)
        return check

    return [
        ("num_tokens", require(s.num_tokens >= 1, f"--num-tokens must be at least 1 (got {s.num_tokens})")),
        ("mask_mode", require(s.mask_mode in MASK_MODES,
                              f"unknown --mask-mode '{s.mask_mode}' (choose from {', '.join(MASK_MODES)})")),
        ("vision_attention", require(s.vision_attention in VISION_ATTENTION_MODES,
                                     f"unknown --vision-attention '{s.vision_attention}' "
                                     f"(choose from {', '.join(VISION_ATTENTION_MODES)})")),
        ("image", require(s.mask_mode != "vision" or s.images, "--mask-mode vision needs at least one --image")),
        ("check", require(s.check >= 0, f"--check must be 0 or more (got {s.check})")),
        ("memory_budget_mb", require(s.memory_budget_mb is None or s.memory_budget_mb > 0,
                                     "--memory-budget-mb must be positive")),
        ("dtype", require(s.dtype in DTYPES, f"unknown --dtype '{s.dtype}' (choose from {', '.join(DTYPES)})")),
        ("layers", lambda: s.layers is None or parse_layers(str(s.layers), None)),
        ("output", require(re.fullmatch(r"[A-Za-z0-9._-]+", s.output or "") and not s.output.startswith("."),
                           f"--output '{s.output}' must be a plain file name (letters, digits, '.', '_', '-')")),
        ("device", lambda: _check_device(s.device)),
        ("device_map", lambda: _check_device_map(s.device_map, s.device)),
        *[("image", lambda path=path: image_check(path)) for path in s.images],
        ("output_dir", lambda: check_output_dir(s.output_dir)),
    ]


def parse_layers(spec: str | None, num_layers: int | None) -> list:
    """'0-3,30' -> [0, 1, 2, 3, 30]; None -> all layers. Checks the range when num_layers is known."""
    if spec is None:
        return list(range(num_layers or 0))
    layers = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UsageError(f"bad --layers '{spec}': use numbers and ranges such as 0-3,30")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"bad --layers range '{part}': end before start")
        layers.update(range(lo, hi + 1))
    if num_layers is not None and max(layers) >= num_layers:
        raise UsageError(f"--layers '{spec}' out of range: the model has layers 0-{num_layers - 1}")
    return sorted(layers)


def check_image(path: str) -> None:
    """An image the processor can read, or UsageError (missing file, not an image)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UsageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
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


def _check_device_map(device_map, device: str) -> None:
    if device_map is None:
        return
    if device != "auto":
        raise UsageError("--device-map places the model itself: leave --device at auto")
    if device_map in DEVICE_MAP_STRATEGIES:
        return
    path = Path(device_map)
    if path.suffix != ".json" or not path.is_file():
        raise UsageError(f"--device-map '{device_map}': use {', '.join(DEVICE_MAP_STRATEGIES)} or an existing JSON file")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--device-map {device_map}: not a JSON object of module name -> device ({exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(f"--device-map {device_map}: not a JSON object of module name -> device")


def _check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        raise UsageError(f"unknown --device '{device}' (auto, cpu, cuda or cuda:N)")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but CUDA is not available on this machine")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")


def _model_path(model: str) -> str:
    """A local directory, or a hub id 'owner/name'; anything else that looks like a path must exist."""
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return expanded
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not model.startswith(".")
    if not looks_like_hub_id or os.path.exists(expanded):
        raise UsageError(f"model directory not found: {model}")
    return model


def _read_prompt(prompt, prompt_file, base_dir: Path) -> str:
    if prompt is None:
        path = _resolve(base_dir, prompt_file or "prompt.txt")
        if not path.is_file():
            raise UsageError(f"prompt file not found: {path} (give --prompt or --prompt-file)")
        prompt = path.read_text(encoding="utf-8")
    prompt = prompt.strip()
    if not prompt:
        raise UsageError("the prompt is empty")
    return prompt


def _split_choices(value: str, allowed, flag: str) -> tuple:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UsageError(f"bad {flag} '{value}' (any of {','.join(allowed)})")
    return tuple(v for v in allowed if v in items)


def _resolve(base_dir: Path, path) -> Path:
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else base_dir / p


def exit_on_usage_error(exc: UsageError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
