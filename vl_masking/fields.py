"""option(): a settings field that is also a command-line option, a config key and an API keyword.

Also the checks that several option values share: whether a spec parses, and that no spec is given
twice. The run's settings (options.RunSettings) are made of these fields: the common ones in
options.py and each measure's own in its Options dataclass (measures/). The parser of each
tool, the config keys and the API's keywords are all made from them, so that a default, a
type and a help text are stated once.
"""

from dataclasses import field

from .errors import UsageError

SHOWN = 80  # characters of a bad value quoted in a message


def option(default, help, *, kind="value", type=str, metavar=None, flag=None, dest=None, tools=("vl", "text"),
           per_tool=None, choices=None, without="warn"):
    """A dataclass field with its option metadata.

    kind: value, switch (store_true), repeat (an option given once per item, a list) or csv
    (comma-separated choices, a tuple). help may be a function of the tool. per_tool: the Tool
    attribute that holds this option's default for each tool (the model and the output name). A
    tool without the flag still has the option, at its default. dest: its key in the parsed options
    and in config files when it is not the field's name (images are given as `image`). choices: the
    allowed items of a csv option (or a function returning them). without: for a measure's own
    option given to a run without that measure, "warn" (ignored, said in a warning) or "refuse".
    """
    meta = {"help": help, "kind": kind, "type": type, "metavar": metavar, "flag": flag, "dest": dest, "tools": tools,
            "per_tool": per_tool, "choices": choices, "without": without}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


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
