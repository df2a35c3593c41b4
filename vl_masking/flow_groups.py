"""The flow measure's groups and pairs: `--flow SOURCE->TARGET`, parsed (Group, FlowPair) and laid on a prompt
(FlowPlan: each pair's source units and target positions at each step).

A group is a named set of positions (last, image, image:K, video, video:K, frame:K (temporal patch K of the
first video), text, question, generated, a span A-B or text:"...") or, as a source, `units`: one knockout per
unit of the run's MaskPlan, or `frames`: one knockout per frame of every video. Nothing here imports torch: the
command line checks a --flow before the model loads, and the prompt's groups before its weights are read.
"""

import re
from dataclasses import dataclass

import numpy as np

from .errors import UsageError
from .units import MaskPlan, SpanSpec, unit_of_positions

DEFAULT_FLOW = "units->last"


GROUP_NAMES = ("last", "image", "image:K", "video", "video:K", "frame:K", "frames", "text", "question", "generated",
               "units", "A-B", 'text:"..."')


@dataclass(frozen=True)
class Group:
    """One side of a flow pair: a named set of positions, or `units` (one knockout per unit)."""

    spec: str
    name: str  # last, image, video, frame, frames, text, question, generated, units, span
    image: int | None = None  # image:K, video:K, frame:K
    span: SpanSpec | None = None

    @classmethod
    def parse(cls, spec: str) -> "Group":
        spec = spec.strip()
        if spec in ("last", "image", "video", "frames", "text", "question", "generated", "units"):
            return cls(spec, spec)
        m = re.fullmatch(r"(image|video|frame):(\d+)", spec)
        if m:
            return cls(spec, m.group(1), image=int(m.group(2)))
        if spec.startswith("text:") or re.fullmatch(r"\d+-\d+", spec):
            return cls(spec, "span", span=SpanSpec.parse(spec, flag="--flow"))
        raise UsageError(f"unknown --flow group '{spec}' (use {', '.join(GROUP_NAMES)})")

    @property
    def key(self) -> tuple:
        return (self.name, self.image, self.span.key if self.span else None)

    @property
    def needs_image(self) -> bool:
        return self.name in ("image", "video", "frame", "frames")

    @property
    def one_by_one(self) -> bool:
        """A source knocked out one unit at a time (units, frames), not as one group."""
        return self.name in ("units", "frames")

    def views(self, tokens) -> list:
        """The views a picture group covers: image (image:K), video (video:K), frame:K, frames."""
        if self.name == "image":
            images = [v for v in tokens.images if v.video < 0]
            pictures = sorted({v.picture for v in images})
            wanted = pictures if self.image is None else pictures[self.image:self.image + 1]
            return [v for v in images if v.picture in wanted]
        if self.name == "video":
            return [v for v in tokens.images if v.video >= 0 and self.image in (None, v.video)]
        frames = [v for v in tokens.images if v.video >= 0]
        if self.name == "frame":
            first = [v for v in frames if v.video == 0]
            return first[self.image:self.image + 1]
        return frames  # frames

    def count(self, tokens) -> int:
        """How many of what image:K, video:K or frame:K counts the prompt has."""
        if self.name == "image":
            return len({v.picture for v in tokens.images if v.video < 0})
        if self.name == "video":
            return len({v.video for v in tokens.images if v.video >= 0})
        return sum(1 for v in tokens.images if v.video == 0)

    def positions(self, tokens, step: int) -> tuple:
        """The group's positions at a step (sequence length prompt_length + step)."""
        length = tokens.prompt_length + step
        if self.name == "last":
            return (length - 1,)
        if self.name == "generated":
            return tuple(range(tokens.prompt_length, length))
        if self.needs_image:  # image:K is image K's vision tokens, all its views; video:K all its frames
            return tuple(p for view in self.views(tokens) for p in range(view.start, view.end) if tokens.is_vision[p])
        if self.name == "text":
            return tuple(np.flatnonzero(tokens.in_text[: tokens.prompt_length]).tolist())
        if self.name == "question":
            return tuple(np.flatnonzero(tokens.in_question[: tokens.prompt_length]).tolist())
        if self.name == "span":
            return tuple(sorted({p for _, ps in self.span.occurrences(tokens, "--flow") for p in ps}))
        raise ValueError(f"group {self.name} has no positions of its own")


@dataclass(frozen=True)
class FlowPair:
    source: Group
    target: Group

    @property
    def name(self) -> str:
        return f"{self.source.spec}->{self.target.spec}"

    @property
    def key(self) -> tuple:
        return (self.source.key, self.target.key)

    @classmethod
    def parse(cls, spec: str) -> "FlowPair":
        source, arrow, target = _split_at_arrow(str(spec))
        if not arrow or not source.strip() or not target.strip():
            raise UsageError(f"bad --flow '{spec}': give SOURCE->TARGET, e.g. image->question or units->last")
        pair = cls(Group.parse(source), Group.parse(target))
        if pair.target.one_by_one:
            raise UsageError(f"bad --flow '{spec}': {pair.target.spec} can only be a source (one knockout each)")
        return pair


def _split_at_arrow(spec: str) -> tuple:
    """SOURCE, '->', TARGET at the first arrow outside quotes: `text:"a->b"->last` is a span and last."""
    quote = None
    for i, ch in enumerate(spec):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'" and spec[max(0, i - 5):i] == "text:":
            quote = ch
        elif spec.startswith("->", i):
            return spec[:i], "->", spec[i + 2:]
    return spec, "", ""


@dataclass
class FlowPlan:
    """The run's flow pairs on its prompt: each pair's source units and target positions at a step."""

    plan: MaskPlan
    pairs: list  # FlowPair, in the order given

    def sources(self, pair: FlowPair, step: int, token_text=None) -> list:
        """The units a pair's source knocks out one at a time: the plan's units, or the group as one unit."""
        if pair.source.name == "units":
            return self.plan.units(step, token_text)
        if pair.source.name == "frames":
            from .units import UNIT_KINDS

            tokens = self.plan.tokens
            return UNIT_KINDS["frame"]().units(tokens, np.flatnonzero(tokens.is_vision[: tokens.prompt_length]))
        positions = pair.source.positions(self.plan.tokens, step)
        return [unit_of_positions(pair.source.spec, "group", positions, self.plan.tokens)]

    def targets(self, pair: FlowPair, step: int) -> tuple:
        return pair.target.positions(self.plan.tokens, step)

    def _has_edges(self, pair: FlowPair, step: int) -> bool:
        if pair.source.one_by_one:
            sources = [p for u in self.sources(pair, step) for p in u.positions]
        else:
            sources = list(pair.source.positions(self.plan.tokens, step))
        targets = list(pair.target.positions(self.plan.tokens, step))
        if not sources or not targets:
            return False
        if min(sources) <= max(targets):
            return True
        if self.plan.bidirectional:
            blocks = self.plan.tokens.image_index
            n = self.plan.prompt_length
            src = {int(blocks[p]) for p in sources if p < n and blocks[p] >= 0}
            return any(p < n and blocks[p] in src for p in targets)
        return False


def flow_plan(plan: MaskPlan, settings) -> FlowPlan:
    """The --flow pairs laid on the prompt; UsageError for an image the prompt lacks, a span past its end or
    unmatched text, and a pair whose source never precedes its target (no attention edge to block)."""
    tokens = plan.tokens
    flows = FlowPlan(plan, [FlowPair.parse(f) for f in settings.flows])
    for pair in flows.pairs:
        for group in (pair.source, pair.target):
            if group.needs_image and group.image is not None and group.image >= group.count(tokens):
                raise UsageError(f"--flow {pair.name}: there is no {group.name} {group.image} "
                                 f"(the prompt has {group.count(tokens)})")
            if group.needs_image and not group.views(tokens):
                raise UsageError(f"--flow {pair.name}: the prompt has no {'video' if group.name != 'image' else 'image'}")
            if group.name == "span":
                group.positions(tokens, 0)  # raises for a span past the prompt or unmatched text
    for pair in flows.pairs:
        if not any(flows._has_edges(pair, step) for step in range(max(0, settings.num_tokens - 1) + 1)):
            raise UsageError(f"--flow {pair.name}: the source never comes before the target, so no attention "
                             "edge from source to target exists to block")
    return flows
