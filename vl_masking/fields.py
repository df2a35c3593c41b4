"""option(): a settings field that is also a command-line option, a config key and an API keyword.

Also the checks that several option values share: whether a spec parses, and that no spec is given
twice. The run's settings (options.RunSettings) are made of these fields: the common ones in
options.py and each measure's own in its Options dataclass (measures/). The parser of each
tool, the config keys and the API's keywords are all made from them, so that a default, a
type and a help text are stated once.
"""

import re
from dataclasses import field

from .errors import UsageError

SHOWN = 80  # characters of a bad value quoted in a message


def option(default, help, *, kind="value", type=str, metavar=None, flag=None, dest=None, tools=("vl", "text"),
           per_tool=None, choices=None, without="warn", check=None, parse=None, path=False, group=None, needs=(), per_row=False):
    """A dataclass field with its option metadata: the only place an option is stated.

    kind: value, switch (store_true), repeat (an option given once per item, a list) or csv
    (comma-separated choices, a tuple). help may be a function of the tool, and may say {choices}.
    per_tool: the Tool attribute that holds this option's default for each tool (the model and the
    output name). A tool without the flag still has the option, at its default. dest: its key in the
    parsed options and in config files when it is not the field's name (images are given as `image`).
    choices: the allowed values (a value option) or items (a csv option), or a function returning
    them; the parser's help, the check and the config reader all read them from here. check: a
    function of the value that raises UsageError. parse: a function (value, Given) -> the settings'
    value, for an option read from more than its own value (the prompt, from --prompt-file too).
    path: a file or directory, relative to the directory of the config file or the command.
    without: for a measure's own option given to a run without that measure, "warn" (ignored, said
    in a warning) or "refuse". group: the --help group of a batch or study option; needs: the
    options it needs one of (--limit needs --dataset). per_row: in a study, the value may name the row's
    columns as {placeholders}, filled in from each row (--flow 'text:"{subject}"->last').
    """
    meta = {"help": help, "kind": kind, "type": type, "metavar": metavar, "flag": flag, "dest": dest, "tools": tools,
            "per_tool": per_tool, "choices": choices, "without": without, "check": check, "parse": parse,
            "path": path, "group": group, "needs": needs,
            "per_row": per_row}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> str:
    """An option field's command-line flag (mask_spans -> --mask-span)."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def key_of(f) -> str:
    """An option field's key in the parsed options and in a config file's prompt (images -> image)."""
    return f.metadata["dest"] or f.name


def item_key(f) -> str:
    """A repeated option's key for one item in a config file (flows -> flow, images -> image)."""
    return flag_of(f)[2:].replace("-", "_")


def choices_of(f) -> tuple:
    choices = f.metadata["choices"]
    return tuple(choices() if callable(choices) else choices or ())


def help_of(f, tool) -> str:
    help = f.metadata["help"](tool) if callable(f.metadata["help"]) else f.metadata["help"]
    return help.replace("{choices}", ", ".join(choices_of(f)))


def parses(parse, spec) -> bool:
    try:
        parse(spec)
    except UsageError:
        return False
    return True


def no_repeats(specs, parse, flag: str) -> list:
    """Each spec parsed; UsageError when two name the same thing (their rows would collide in the table)."""
    seen = {}
    parsed = []
    for spec in specs:
        item = parse(spec)
        if item.key in seen:
            same = "twice" if seen[item.key] == spec else f"twice ('{shown(seen[item.key])}' and '{shown(spec)}')"
            raise UsageError(f"{flag} {shown(spec)} is given {same}: give each once")
        seen[item.key] = spec
        parsed.append(item)
    return parsed


def shown(value) -> str:
    """A value as quoted in an error message: at most SHOWN characters."""
    text = str(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def layer_ranges(spec: str, flag: str = "--layers") -> list:
    """'0-3,30' -> [(0, 3), (30, 30)], checked for syntax and order without expanding anything."""
    ranges = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d{1,9})(?:-(\d{1,9}))?", part)
        if not m:
            raise UsageError(f"bad {flag} '{shown(spec)}': use numbers and ranges such as 0-3,30")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"bad {flag} range '{part}': end before start")
        ranges.append((lo, hi))
    return ranges


def parse_layers(spec: str | None, num_layers: int, flag: str = "--layers", what: str = "the model has layers") -> list:
    """'0-3,30' -> [0, 1, 2, 3, 30]; None -> all layers. Bounds are checked before any range is expanded."""
    if spec is None:
        return list(range(num_layers))
    ranges = layer_ranges(spec, flag)
    top = max(hi for _, hi in ranges)
    if top >= num_layers:
        raise UsageError(f"{flag} '{shown(spec)}' out of range: {what} 0-{num_layers - 1}")
    return sorted({layer for lo, hi in ranges for layer in range(lo, hi + 1)})
