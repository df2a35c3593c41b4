"""Mask units: which key positions are hidden together in one knockout.

A unit is a set of positions hidden at once, in every head: one token, a word, a whole
image, an R x C region of an image's merged token grid, a span the user names, or (for
flow analysis) a named group such as `question`. Each unit kind is one registered class
with `parse` (its option argument) and `units` (the units it makes from the token map).

The MaskPlan is the one object that says what is hidden, per generation step: the units
with their labels, kinds and member positions, and the n x S boolean hide mask. It is
built once from the token map and the options; the engine, the reference, the table
builder, the console and the metadata all read it, and nothing else derives positions.

This module imports torch only where a hide mask is made, so that options can be
validated before torch is loaded.
"""

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError



@dataclass(frozen=True)
class Unit:
    """Positions hidden together, and how to show them."""

    label: str
    kind: str  # token, word, image, region, span, group
    positions: tuple
    token_type: str = "text"  # text, vision, or mixed (a span or group across both)
    image_index: int = -1
    grid_row: int = -1  # image units: the top-left cell of the block ...
    grid_col: int = -1
    grid_rows: int = -1  # ... and its extent (1 x 1 for a vision token; -1 for text)
    grid_cols: int = -1

    @property
    def first(self) -> int:
        return self.positions[0] if self.positions else -1

    @property
    def size(self) -> int:
        return len(self.positions)

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "positions": list(self.positions),
                "token_type": self.token_type, "image_index": self.image_index, "grid_row": self.grid_row,
                "grid_col": self.grid_col, "grid_rows": self.grid_rows, "grid_cols": self.grid_cols}


def unit_of_positions(label: str, kind: str, positions, tokens) -> Unit:
    """A unit over arbitrary positions: its type from the token map, a grid box when inside one image."""
    positions = tuple(sorted(int(p) for p in positions))
    n = len(tokens.is_vision)
    inside = [p for p in positions if p < n]
    vision = [p for p in inside if tokens.is_vision[p]]
    kinds = ({"vision"} if vision else set()) | ({"text"} if len(vision) < len(positions) else set())
    token_type = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "text")
    if token_type == "vision" and len({int(tokens.image_index[p]) for p in vision}) == 1:
        rows, cols = tokens.grid_row[vision], tokens.grid_col[vision]
        return Unit(label, kind, positions, "vision", int(tokens.image_index[vision[0]]), int(rows.min()),
                    int(cols.min()), int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1))
    return Unit(label, kind, positions, token_type)


# -- unit kinds -----------------------------------------------------------------------

UNIT_KINDS = {}


def register(name: str):
    def decorate(cls):
        cls.name = name
        UNIT_KINDS[name] = cls
        return cls
    return decorate


class UnitKind(ABC):
    """One way of grouping positions into units: a subclass registered under its --mask-unit name (register)."""

    name = ""
    covers = ("text", "vision")  # which token types it groups
    syntax = ""  # how --mask-unit writes it when it takes an argument ("region:RxC"); "" for its name alone

    @classmethod
    def parse(cls, argument: str | None) -> "UnitKind":
        if argument is not None:
            raise UsageError(f"--mask-unit {cls.name} takes no argument (got '{cls.name}:{argument}')")
        return cls()

    @abstractmethod
    def units(self, tokens, positions: np.ndarray) -> list:
        """Units over `positions` (eligible prompt positions of the types this kind covers)."""

    @property
    def spec(self) -> str:
        return self.name


@register("token")
class TokenUnits(UnitKind):
    def units(self, tokens, positions):
        return [token_unit(tokens, int(p)) for p in positions]


def token_unit(tokens, position: int, label: str | None = None) -> Unit:
    text = tokens.text[position] if label is None else label
    if tokens.is_vision[position]:
        return Unit(text, "token", (position,), "vision", int(tokens.image_index[position]),
                    int(tokens.grid_row[position]), int(tokens.grid_col[position]), 1, 1)
    return Unit(text, "token", (position,))


@register("word")
class WordUnits(UnitKind):
    """Runs of text tokens that the tokenizer split from one word.

    A new word starts at a token that begins with whitespace, at a special token and after
    one, and after a token that ends a line; so special tokens and template markup stay
    alone and `.` joins the word before it.
    """

    covers = ("text",)

    def units(self, tokens, positions):
        words, current = [], []
        previous = None
        for p in (int(p) for p in positions):
            text = tokens.text[p]
            starts = (not current or previous is None or p != previous + 1 or tokens.is_special[p]
                      or tokens.is_special[previous] or text[:1].isspace() or tokens.text[previous].endswith("\n"))
            if starts and current:
                words.append(current)
                current = []
            current.append(p)
            previous = p
        if current:
            words.append(current)
        return [Unit("".join(tokens.text[p] for p in w), "word", tuple(w)) for w in words]


class PictureUnits(UnitKind):
    """One unit per picture of a medium (an image with all its views; a video with all its frames)."""

    covers = ("vision",)
    videos = False

    def units(self, tokens, positions):
        eligible = set(int(p) for p in positions)
        out = []
        for k, (start, end) in enumerate(tokens.pictures):  # a picture: all its views
            first = next(view for view in tokens.images if view.picture == k)
            members = tuple(p for p in range(start, end) if p in eligible and tokens.is_vision[p])
            if members and (first.video >= 0) == self.videos:
                label = f"video {first.video}" if self.videos else f"image {k}"
                out.append(Unit(label, self.name, members, "vision", first.index, 0, 0,
                                first.grid_rows, first.grid_cols))
        return out


@register("image")
class ImageUnits(PictureUnits):
    pass


@register("video")
class VideoUnits(PictureUnits):
    videos = True


@register("frame")
class FrameUnits(UnitKind):
    """Each temporal patch of a video (the frames the model sees as one grid), with its time."""

    covers = ("vision",)

    def units(self, tokens, positions):
        eligible = set(int(p) for p in positions)
        out = []
        for view in tokens.images:
            members = tuple(p for p in range(view.start, view.end - bool(view.trailer)) if p in eligible)
            if view.video >= 0 and members:
                label = view.label + (f" ({view.time:.1f} s)" if view.time is not None else "")
                out.append(Unit(label, "frame", members, "vision", view.index, 0, 0, view.grid_rows,
                                view.grid_cols))
        return out


@register("region")
class RegionUnits(UnitKind):
    """R x C blocks of each image's merged token grid, row-major; blocks at the right and bottom edges are smaller."""

    covers = ("vision",)
    syntax = "region:RxC"

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols

    @classmethod
    def parse(cls, argument):
        m = re.fullmatch(r"(\d+)x(\d+)", argument or "")
        if not m:
            raise UsageError(f"bad --mask-unit 'region:{argument or ''}': give the block size as region:RxC, "
                             "e.g. region:2x2")
        rows, cols = int(m.group(1)), int(m.group(2))
        if rows < 1 or cols < 1:
            raise UsageError(f"bad --mask-unit 'region:{argument}': rows and columns must be at least 1")
        return cls(rows, cols)

    @property
    def spec(self) -> str:
        return f"region:{self.rows}x{self.cols}"

    def units(self, tokens, positions):
        eligible = set(int(p) for p in positions)
        out = []
        for image in tokens.images:
            for top in range(0, image.grid_rows, self.rows):
                for left in range(0, image.grid_cols, self.cols):
                    bottom, right = min(top + self.rows, image.grid_rows), min(left + self.cols, image.grid_cols)
                    members = tuple(image.position(r, c) for r in range(top, bottom) for c in range(left, right)
                                    if image.position(r, c) in eligible)
                    if not members:
                        continue
                    rows = f"rows {top}-{bottom - 1}" if bottom - top > 1 else f"row {top}"
                    cols = f"cols {left}-{right - 1}" if right - left > 1 else f"col {left}"
                    out.append(Unit(f"{image.label} {rows} {cols}", "region", members, "vision", image.index,
                                    top, left, bottom - top, right - left))
        return out


def unit_kind_names(images: bool = True) -> list:
    """The --mask-unit spellings there are (region:RxC), those that group text only when there are no images."""
    return [cls.syntax or name for name, cls in UNIT_KINDS.items() if images or "text" in cls.covers]


def text_unit_kinds() -> tuple:
    """The kinds that group text tokens (--text-unit's choices)."""
    return tuple(name for name, cls in UNIT_KINDS.items() if "text" in cls.covers)


def parse_unit_kind(spec: str) -> UnitKind:
    """A registered kind's spelling ('token', 'word', 'image', 'region:RxC') -> its UnitKind; UsageError otherwise."""
    name, _, argument = str(spec).partition(":")
    if name not in UNIT_KINDS:
        raise UsageError(f"unknown --mask-unit '{spec}' (choose from {', '.join(unit_kind_names())})")
    return UNIT_KINDS[name].parse(argument if ":" in str(spec) else None)


# -- spans ------------------------------------------------------------------------------

def parse_target(spec: str) -> str | None:
    """--target: None for `predicted` (the unblocked model's greedy token), else the text of `text:"..."`,
    whose first token is read (written as it would follow the prompt: " Paris" with its space)."""
    spec = str(spec).strip()
    if spec == "predicted":
        return None
    if spec.startswith("text:"):
        text = spec[5:]
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1]
        if text:
            return text
    if spec == "answer":
        raise UsageError("--target answer reads each example's answer: it needs --dataset with --columns answer=COL")
    raise UsageError(f"bad --target '{_shorten(spec)}': use predicted or text:\"...\" (its first token)")


@dataclass(frozen=True)
class SpanSpec:
    """`A-B` (positions, inclusive) or `text:"..."` (every occurrence in the prompt text)."""

    spec: str
    start: int = -1
    end: int = -1
    text: str | None = None

    @classmethod
    def parse(cls, spec: str, flag: str = "--mask-span") -> "SpanSpec":
        spec = str(spec).strip()
        if spec.startswith("text:"):
            text = spec[5:]
            if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
                text = text[1:-1]
            if not text:
                raise UsageError(f"bad {flag} '{spec}': the text is empty")
            return cls(spec, text=text)
        m = re.fullmatch(r"(\d+)-(\d+)", spec)
        if not m:
            raise UsageError(f"bad {flag} '{spec}': use positions A-B (inclusive) or text:\"some words\"")
        start, end = int(m.group(1)), int(m.group(2))
        if end < start:
            raise UsageError(f"bad {flag} '{spec}': the span ends before it starts")
        return cls(spec, start=start, end=end)

    @property
    def key(self) -> tuple:
        """What the span names, however it was written ('3-5' and ' 3-5', text:"a" and text:'a' are one span)."""
        return (self.start, self.end, self.text)

    def occurrences(self, tokens, flag: str = "--mask-span") -> list:
        """[(label, positions)] in the prompt; UsageError when nothing matches or the span is outside it."""
        if self.text is None:
            if self.end >= tokens.prompt_length:
                raise UsageError(f"{flag} {self.spec} is past the prompt (positions 0-{tokens.prompt_length - 1})")
            return [(self.spec, tuple(range(self.start, self.end + 1)))]
        found = tokens.find_text(self.text)
        if not found:
            raise UsageError(f"{flag} text:\"{_shorten(self.text)}\" does not occur in the prompt text")
        if len(found) == 1:
            return [(self.text, found[0])]
        return [(f"{self.text} #{k + 1}", positions) for k, positions in enumerate(found)]


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the plan ---------------------------------------------------------------------------

@dataclass
class MaskPlan:
    """What is hidden at each step: units (labels, kinds, positions) and their n x S hide mask."""

    tokens: object  # the prompt's TokenMap
    unit_spec: str
    text_unit: str
    mask_mode: str
    prompt_units: list  # units over prompt positions, in order of first position, then the spans
    generated_are_units: bool  # generated tokens are units of their own (not in --mask-mode vision)
    bidirectional: bool  # the prompt's image tokens see each other
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def prompt_length(self) -> int:
        return self.tokens.prompt_length

    def units(self, step: int, token_text=None) -> list:
        """The units at a step; generated tokens are labelled from `token_text` (the final token texts)."""
        generated = []
        if self.generated_are_units:
            for p in range(self.prompt_length, self.prompt_length + step):
                generated.append(Unit(token_text[p] if token_text is not None and p < len(token_text) else "",
                                      "token", (p,)))
        return self.prompt_units + generated

    def unit_count(self, step: int) -> int:
        return len(self.prompt_units) + (step if self.generated_are_units else 0)

    def hide_mask(self, step: int, device=None):
        """(units, sequence length) bool tensor: row n is True at the positions unit n hides."""
        key = (step, str(device))
        if key not in self._masks:
            self._masks[key] = positions_mask([u.positions for u in self.units(step)],
                                              self.prompt_length + step, device)
        return self._masks[key]

    def describe(self) -> str:
        kinds = {}
        for u in self.prompt_units:
            kinds[u.kind] = kinds.get(u.kind, 0) + 1
        counts = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in kinds.items()) or "no prompt units"
        return f"mask unit {self.unit_spec} (text: {self.text_unit}): {counts}"

    def to_metadata(self, steps: int, token_text) -> dict:
        """Every unit of every step: prompt units from step 0, generated tokens from the step after they appear."""
        from .reader_rules import short_label

        views = {view.index: {"picture": view.picture, "name": view.name, "video": view.video}
                 for view in self.tokens.images}
        units = []
        for u in self.units(steps - 1 if steps else 0, token_text):
            entry = u.to_dict()
            entry["short"] = short_label(entry, views.get(entry["image_index"]))
            entry["from_step"] = max(0, u.first - self.prompt_length + 1) if u.first >= self.prompt_length else 0
            units.append(entry)
        return {"mask_unit": self.unit_spec, "text_unit": self.text_unit,
                "units_per_step": [self.unit_count(s) for s in range(steps)], "units": units}


def unit_columns(units: list, index) -> dict:
    """The unit columns of a result table, for rows that each refer to units[index[row]]."""
    import pandas as pd

    index = np.asarray(index, dtype=np.int64)

    def ints(values):
        return np.asarray(values, dtype=np.int32)[index]

    def texts(values):
        codes = {}
        per_unit = np.fromiter((codes.setdefault(v, len(codes)) for v in values), dtype=np.int32, count=len(values))
        return pd.Categorical.from_codes(per_unit[index], list(codes), validate=False)

    grid_rows = [u.grid_rows if u.token_type == "vision" else -1 for u in units]
    grid_cols = [u.grid_cols if u.token_type == "vision" else -1 for u in units]
    labels = texts([u.label for u in units])
    return {
        "token_position": ints([u.first for u in units]),
        "token_masked": labels,
        "token_type": texts([u.token_type for u in units]),
        "image_index": ints([u.image_index for u in units]),
        "grid_row": ints([u.grid_row for u in units]),
        "grid_col": ints([u.grid_col for u in units]),
        "unit": labels.copy(),
        "unit_kind": texts([u.kind for u in units]),
        "unit_size": ints([u.size for u in units]),
        "unit_positions": texts([",".join(map(str, u.positions)) for u in units]),
        "grid_rows": ints(grid_rows),
        "grid_cols": ints(grid_cols),
    }


def positions_mask(position_lists, length: int, device=None):
    """(len(position_lists), length) bool tensor, True at each list's positions."""
    import torch

    rows = [i for i, ps in enumerate(position_lists) for _ in ps]
    cols = [p for ps in position_lists for p in ps]
    mask = torch.zeros(len(position_lists), length, dtype=torch.bool)
    if rows:
        mask[torch.tensor(rows), torch.tensor(cols)] = True
    return mask.to(device) if device is not None else mask


def default_text_unit(unit_spec: str) -> str:
    """A kind that groups image tokens only (image, region) leaves text to words; any other groups text itself."""
    name = str(unit_spec).partition(":")[0]
    return "word" if "text" not in UNIT_KINDS[name].covers else name


def build_plan(tokens, settings) -> MaskPlan:
    """The run's MaskPlan from the prompt's token map and the options; UsageError for spans that do not fit."""
    vision_kind = parse_unit_kind(settings.mask_unit)
    text_unit = settings.text_unit or default_text_unit(settings.mask_unit)
    text_kind = parse_unit_kind(text_unit)
    if "vision" not in vision_kind.covers:
        vision_kind = TokenUnits()
    n = tokens.prompt_length
    eligible = np.zeros(n, dtype=bool)
    if settings.mask_mode in ("text", "both"):
        eligible |= ~tokens.is_vision[:n]
    if settings.mask_mode in ("vision", "both"):
        eligible |= tokens.is_vision[:n]
    text_positions = np.flatnonzero(eligible & ~tokens.is_vision[:n])
    vision_positions = np.flatnonzero(eligible & tokens.is_vision[:n])
    units = text_kind.units(tokens, text_positions) + vision_kind.units(tokens, vision_positions)
    units.sort(key=lambda u: u.first)
    for spec in settings.mask_spans:
        for label, positions in SpanSpec.parse(spec).occurrences(tokens):
            units.append(unit_of_positions(label, "span", positions, tokens))
    plan = MaskPlan(tokens=tokens, unit_spec=settings.mask_unit, text_unit=text_unit, mask_mode=settings.mask_mode,
                    prompt_units=units,
                    generated_are_units=settings.mask_mode != "vision",
                    bidirectional=settings.vision_attention == "bidirectional" and bool(tokens.images))
    return plan
