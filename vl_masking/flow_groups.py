"""The flow measure's groups and pairs: `--flow SOURCE->TARGET`, parsed (Group, FlowPair) and laid on a prompt
(FlowPlan: each pair's source units and target positions at each step).

A group is a named set of positions (last, image, image:K, text, question, generated, a span A-B or
text:"...") or `units`: one knockout per unit of the run's MaskPlan. Nothing here imports torch: the
command line checks a --flow before the model loads, and the prompt's groups before its weights are read.
"""

import re
from dataclasses import dataclass

import numpy as np

from .errors import UsageError
from .units import MaskPlan, SpanSpec, unit_of_positions

DEFAULT_FLOW = "units->last"


GROUP_NAMES = ("last", "image", "image:K", "text", "question", "generated", "units", "A-B", 'text:"..."')


@dataclass(frozen=True)
class Group:
    """One side of a flow pair: a named set of positions, or `units` (one knockout per unit)."""

    spec: str
    name: str  # last, image, text, question, generated, units, span
    image: int | None = None
    span: SpanSpec | None = None

    @classmethod
    def parse(cls, spec: str) -> "Group":
        spec = spec.strip()
        if spec in ("last", "image", "text", "question", "generated", "units"):
            return cls(spec, spec)
        m = re.fullmatch(r"image:(\d+)", spec)
        if m:
            return cls(spec, "image", image=int(m.group(1)))
        if spec.startswith("text:") or re.fullmatch(r"\d+-\d+", spec):
            return cls(spec, "span", span=SpanSpec.parse(spec, flag="--flow"))
        raise UsageError(f"unknown --flow group '{spec}' (use {', '.join(GROUP_NAMES)})")

    @property
    def key(self) -> tuple:
        return (self.name, self.image, self.span.key if self.span else None)

    @property
    def needs_image(self) -> bool:
        return self.name == "image"

    def positions(self, tokens, step: int) -> tuple:
        """The group's positions at a step (sequence length prompt_length + step)."""
        length = tokens.prompt_length + step
        if self.name == "last":
            return (length - 1,)
        if self.name == "generated":
            return tuple(range(tokens.prompt_length, length))
        if self.name == "image":  # image:K is picture K's image tokens, all its views
            pictures = tokens.pictures if self.image is None else [tokens.pictures[self.image]]
            return tuple(p for start, end in pictures for p in range(start, end) if tokens.is_vision[p])
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
        if pair.target.name == "units":
            raise UsageError(f"bad --flow '{spec}': units can only be a source (one knockout per unit)")
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
        positions = pair.source.positions(self.plan.tokens, step)
        return [unit_of_positions(pair.source.spec, "group", positions, self.plan.tokens)]

    def targets(self, pair: FlowPair, step: int) -> tuple:
        return pair.target.positions(self.plan.tokens, step)

    def _has_edges(self, pair: FlowPair, step: int) -> bool:
        if pair.source.name == "units":
            sources = [p for u in self.plan.units(step) for p in u.positions]
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
            if group.name == "image" and group.image is not None and group.image >= len(tokens.pictures):
                raise UsageError(f"--flow {pair.name}: there is no image {group.image} "
                                 f"(the prompt has {len(tokens.pictures)})")
            if group.name == "span":
                group.positions(tokens, 0)  # raises for a span past the prompt or unmatched text
    for pair in flows.pairs:
        if not any(flows._has_edges(pair, step) for step in range(max(0, settings.num_tokens - 1) + 1)):
            raise UsageError(f"--flow {pair.name}: the source never comes before the target, so no attention "
                             "edge from source to target exists to block")
    return flows
