"""Batch config files: YAML -> one validated RunSettings per prompt, every mistake reported at once.

    defaults:                          # any command-line option, applied to every prompt
      model: Qwen/Qwen3-VL-4B-Instruct
      num_tokens: 3
      mask_mode: vision
    prompts:
      - name: piggy_describe           # output files are named after it
        images: [examples/piggy.png]   # or image: one path (videos: / video: likewise)
        prompt: Describe this image.   # or prompt_file:
        num_tokens: 10                 # per-prompt override of any default
        enabled: true                  # false: skipped, listed as skipped

Keys are the command-line options with underscores. Paths in the file (images, videos,
prompt_file, output_dir, a local model directory, a device-map JSON) are relative to the file; options given on
the command line next to --config override the file and are relative to the working
directory. Image files must exist; whether they decode is found out when their prompt
runs, so one bad image fails one prompt, not the batch.
"""

import argparse
import hashlib
import json
import os
import re
import reprlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from .errors import UsageError
from .fields import item_key, key_of
from .options import (BATCH_KEYS, RunSettings, build_parser, collect_settings, option_fields, read_text_file,
                      tool_defaults, unused_options)
from .tools import Tool

HASH_IGNORES = ("memory_budget_mb", "output_dir")  # settings that change neither the result nor its files
NOT_IN_FILE = {"output": "files are named after the prompt's name", "config": "nested configs are not supported",
               "resume": "give --resume on the command line", "tool": "the tool is the script you run"}
TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list of text"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
MAX_YAML_VALUES = 100_000  # a config expanding to more values through aliases is refused ("billion laughs")


def list_keys() -> dict:
    """{a repeated option's key in the file: its one-item key}: images/image, mask_spans/mask_span, flows/flow."""
    return {f.name: item_key(f) for f in option_fields() if f.metadata["kind"] == "repeat"}


def path_keys() -> tuple:
    """The keys whose value is a path, relative to the config file (the repeated ones are resolved per item)."""
    return ("prompt_file", *[key_of(f) for f in option_fields() if f.metadata["path"] and f.metadata["kind"] == "value"])


@dataclass
class BatchPrompt:
    index: int  # position in the file
    name: str
    enabled: bool
    settings: RunSettings | None  # None when disabled

    @cached_property
    def settings_hash(self) -> str | None:
        """Hash of everything that shapes the result, image and video contents included (read once)."""
        if self.settings is None:
            return None
        values = {k: v for k, v in self.settings.to_dict().items() if k not in HASH_IGNORES}
        values["image_sha256"] = [_file_digest(p) for p in self.settings.images]
        values["video_sha256"] = [_file_digest(p) for p in self.settings.videos]
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass
class BatchConfig:
    path: Path
    tool: Tool
    prompts: list
    output_dir: str  # where the manifest goes: the defaults' output directory
    warnings: tuple = ()  # options given that some prompts do not use, one line each with those prompts

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def manifest_path(self) -> Path:
        return Path(self.output_dir) / f"{self.name}.batch.json"


def option_types(tool: Tool) -> dict:
    """The type each config key takes, from the command-line parser of that tool."""
    types = {}
    for action in build_parser(tool)._actions:
        if action.dest in ("help", "output", *BATCH_KEYS):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            types[action.dest] = (bool,)
        elif isinstance(action, argparse._AppendAction):
            types[action.dest] = (str, list)  # `image: one path` or a list (also under `images:`)
        elif action.type is int:
            types[action.dest] = (int,)
        elif action.type is float:
            types[action.dest] = (int, float)
        else:
            types[action.dest] = (str,)
    types["layers"] = (str, int)  # `layers: 3` is one layer
    for f in option_fields():
        if f.metadata["kind"] == "csv":  # `variants: Full,Attn` or `variants: [Full, Attn]`
            types[f.name] = (str, list)
    for f in option_fields():  # `flows: [a, b]` or `flow: a`
        if f.metadata["kind"] == "repeat" and key_of(f) in types:
            types[f.name], types[item_key(f)] = (list,), (str,)
    return types


def load_batch(path, tool: Tool, overrides: dict | None = None) -> BatchConfig:
    """Read and validate a whole config file; UsageError listing every problem."""
    path = Path(path)
    types = option_types(tool)
    document = _read_yaml(path, string_keys={k for k, t in types.items() if str in t or list in t} | {"name"})
    problems = [f"{key}: unknown top-level key (use defaults and prompts)"
                for key in document if key not in ("defaults", "prompts")]
    base_dir = path.resolve().parent
    defaults = document.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append("defaults: expected a mapping of option: value")
        defaults = {}
    problems += [f"defaults: {p}" for p in _check_keys(defaults, types, allow_prompt_keys=False)]
    # Every prompt starts from the tool's defaults, then the file's, then its own keys, then the command line.
    base_values = {**tool_defaults(tool), **_as_options(defaults, types, base_dir)}
    overrides = overrides or {}
    entries = document.get("prompts")
    if not isinstance(entries, list) or not entries:
        problems.append("prompts: expected a list of prompts, each with at least a name and a prompt")
        entries = []

    prompts, first_seen, unused = [], {}, {}
    given_everywhere = _keys_given(defaults) | set(overrides)
    for index, entry in enumerate(entries):
        prompt, found = _check_prompt(index, entry, types, base_dir, base_values, overrides, first_seen)
        problems += found
        if prompt is not None:
            prompts.append(prompt)
        if prompt is not None and prompt.settings is not None and not found:
            for line in unused_options(prompt.settings, given_everywhere | _keys_given(entry)):
                unused.setdefault(line, []).append(prompt.name)
    if prompts and not any(p.enabled for p in prompts):
        problems.append("prompts: every prompt is disabled (enabled: false)")
    if len(problems) == 1:
        raise UsageError(f"config {path}: {problems[0]}")
    if problems:
        listing = "\n  ".join(problems)
        raise UsageError(f"config {path} has {len(problems)} problems:\n  {listing}")
    output_dir = str(overrides.get("output_dir") or base_values.get("output_dir") or Path.cwd() / "output")
    warnings = tuple(f"{line} (prompt{'s' if len(names) > 1 else ''} {', '.join(names)})"
                     for line, names in unused.items())
    return BatchConfig(path=path.resolve(), tool=tool, prompts=prompts, output_dir=output_dir, warnings=warnings)


def _keys_given(entry) -> set:
    """The settings keys a mapping of the file gives (flow: and flows: are both flows)."""
    singular = {one: plural for plural, one in list_keys().items()}
    return {singular.get(key, key) for key in entry} if isinstance(entry, dict) else set()


def _read_yaml(path: Path, string_keys: set) -> dict:
    """safe_load, with two guards: aliases may not expand past MAX_YAML_VALUES values, and a plain
    scalar under a text-valued key is the text the user wrote (`name: off` is "off", not False)."""
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    text = read_text_file(path, "config")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise UsageError(f"config {path}: expected a mapping with 'defaults' and 'prompts'")
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise UsageError(f"config {path}: its aliases expand to more than {MAX_YAML_VALUES:,} values; refused")
        _keep_text(node, string_keys)
        document = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise UsageError(f"config {path} is not valid YAML: {_show(' '.join(str(exc).split()), 200)}") from None
    finally:
        loader.dispose()
    if not isinstance(document, dict):
        raise UsageError(f"config {path}: expected a mapping with 'defaults' and 'prompts'")
    return document


def _expanded_size(node, seen: dict) -> int:
    """Values in the document once every alias is expanded, computed without expanding them."""
    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = 1  # a cycle counts once
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, seen) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, seen) + _expanded_size(v, seen) for k, v in node.value)
    seen[id(node)] = size
    return size


def _keep_text(node, string_keys: set) -> None:
    """Plain scalars under text-valued keys (and in their lists) are read as written."""
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _keep_text(child, string_keys)
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value in string_keys:
            for scalar in ([value] if isinstance(value, yaml.ScalarNode) else
                           value.value if isinstance(value, yaml.SequenceNode) else []):
                plain = isinstance(scalar, yaml.ScalarNode) and scalar.style is None
                if plain and scalar.tag != "tag:yaml.org,2002:null":
                    scalar.tag = "tag:yaml.org,2002:str"
        else:
            _keep_text(value, string_keys)


_short_repr = reprlib.Repr()
_short_repr.maxlevel, _short_repr.maxlist, _short_repr.maxdict, _short_repr.maxstring = 2, 4, 4, 60


def _show(value, limit: int = 80) -> str:
    """A value as quoted in a message: bounded however large or deeply nested it is."""
    text = value if isinstance(value, str) else _short_repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_prompt(index, entry, types, base_dir, base_values, overrides, first_seen) -> tuple:
    """(BatchPrompt or None, problems) for one entry of `prompts:`."""
    label = f"prompt #{index + 1}"
    if not isinstance(entry, dict):
        return None, [f"{label}: expected a mapping (name:, prompt:, ...)"]
    problems = []
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        problems.append(f"{label}: name: {'missing' if name is None else _show(repr(name)) + ' is not'} "
                        "a plain file name (letters, digits, '.', '_', '-'; no path separators)")
        name = None
    else:
        label = f"prompt '{name}'"
        if name in first_seen:
            problems.append(f"{label}: name: duplicate (also prompt #{first_seen[name] + 1})")
        first_seen.setdefault(name, index)
    problems += [f"{label}: {p}" for p in _check_keys(entry, types, allow_prompt_keys=True)]
    if entry.get("enabled", True) is False:  # a disabled prompt is not checked beyond its keys
        return BatchPrompt(index, name or f"#{index + 1}", False, None), problems

    own = _as_options(entry, types, base_dir)
    values = {**base_values, **own, **overrides, "output": name or "unnamed"}
    if "prompt" not in overrides and ("prompt" in entry or "prompt_file" in entry):
        # A prompt's own text or file replaces the default's, whichever of the two each gives.
        values["prompt"], values["prompt_file"] = own.get("prompt"), own.get("prompt_file")
    if values.get("prompt") is None and values.get("prompt_file") is None:
        if "prompt" not in entry and "prompt_file" not in entry:
            problems.append(f"{label}: prompt: missing (give prompt: or prompt_file:)")
        values["prompt"] = "-"  # stands in so that the prompt's other keys are still checked
    settings, found = collect_settings(values, Path.cwd(), image_check=_image_exists)
    problems += [f"{label}: {key}: {message}" for key, message in found]
    return BatchPrompt(index, name, True, settings), problems


def _check_keys(entry: dict, types: dict, allow_prompt_keys: bool) -> list:
    problems = []
    for key, value in entry.items():
        if allow_prompt_keys and key in ("name", "enabled"):
            if key == "enabled" and not isinstance(value, bool):
                problems.append(f"enabled: expected true or false, got {_show(value)}")
            continue
        if key in NOT_IN_FILE:
            problems.append(f"{key}: not allowed in a config ({NOT_IN_FILE[key]})")
        elif key not in types:
            hint = " (did you mean images?)" if key == "image_paths" else ""
            problems.append(f"{key}: unknown key{hint}")
        elif not _has_type(value, types[key]):
            expected = " or ".join(dict.fromkeys(TYPE_NAMES[t] for t in types[key]))
            shown = _show(repr(value) if isinstance(value, str) else value)
            problems.append(f"{key}: expected {expected}, got {shown}")
    for plural, one in list_keys().items():
        if one in entry and plural in entry:
            problems.append(f"{plural}: give {one}: or {plural}:, not both")
    if "prompt" in entry and "prompt_file" in entry:
        problems.append("prompt: give prompt: or prompt_file:, not both")
    return problems


def _has_type(value, allowed: tuple) -> bool:
    if isinstance(value, bool) and bool not in allowed:
        return False  # YAML `yes` is a bool, and bool is an int to Python
    if isinstance(value, list):
        return list in allowed and all(isinstance(v, str) for v in value)
    return isinstance(value, allowed)


def _as_options(entry: dict, types: dict, base_dir: Path) -> dict:
    """Config values as the option values the command line would give (paths made absolute)."""
    # Keys of the wrong type were reported already; leaving them out lets the rest be checked.
    lists = list_keys()
    values = {k: v for k, v in entry.items()
              if k in types and k not in lists.values() and k not in lists and _has_type(v, types[k])}
    for key in (f.name for f in option_fields() if f.metadata["kind"] == "csv"):
        if isinstance(values.get(key), list):
            values[key] = ",".join(values[key])
    if isinstance(values.get("layers"), int):
        values["layers"] = str(values["layers"])
    for f in (f for f in option_fields() if f.metadata["kind"] == "repeat"):  # `images: [a, b]` or `image: a`
        plural, one = f.name, item_key(f)
        items = entry.get(plural) if plural in entry else ([entry[one]] if one in entry else None)
        if items is not None and _has_type(items, (list,)):
            values[key_of(f)] = [str(_resolve(base_dir, p)) if f.metadata["path"] else p for p in items]
    for key in path_keys():
        if isinstance(values.get(key), str):
            values[key] = str(_resolve(base_dir, values[key]))
    if isinstance(values.get("model"), str) and (base_dir / values["model"]).is_dir():
        values["model"] = str(base_dir / values["model"])  # a local model directory next to the file
    if isinstance(values.get("device_map"), str) and values["device_map"].endswith(".json"):
        values["device_map"] = str(_resolve(base_dir, values["device_map"]))
    return values


def _resolve(base_dir: Path, path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else base_dir / p


def _file_digest(path) -> str:
    """sha256 of a file, or of a folder's files (a video's frames: their names and contents, in name order)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        for part in sorted(path.iterdir()) if path.is_dir() else [path]:
            digest.update(part.name.encode() + b"\0" if part != path else b"")
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return "unreadable"
    return digest.hexdigest()


def _image_exists(path: str, max_pixels=None) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"image not found: {path}")
