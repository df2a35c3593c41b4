"""The flow measure: block the attention edges from a source to a target in a window of W layers around each
layer and read how the prediction changes (Geva et al. 2023; Zhang et al., CVPR 2025). The engine, exact and
batched, is flow.FlowEngine; the reference, full forward passes, is reference.reference_flow.

Rows: generation step x flow x window centre x source unit. Metrics: the relative change of the probability
of the token the unblocked model predicts, the change of its log-probability, KL(base || blocked), and the
blocked probability itself.
"""

from dataclasses import dataclass

from ..errors import UsageError
from ..fields import option
from ..flow_groups import DEFAULT_FLOW, FlowPair, flow_plan
from ..units import parse_target
from .base import Measure, Metric, register

FLOW_COLUMNS = ["generation_step", "flow", "layer", "window_start", "window_end", "token_position", "token_masked",
                "token_type", "image_index", "grid_row", "grid_col", "grid_rows", "grid_cols", "unit", "unit_kind",
                "unit_size", "unit_positions", "target_token_id", "target_token", "predicted_token", "correct",
                "base_prob", "prob",
                "rel_change_pct", "delta_logprob", "kl", "top1_changed", "new_top1_token"]
UNIT_OPTIONS = ("mask_unit", "text_unit", "mask_spans")  # they make the units of a flow whose source is `units`


@register
class FlowMeasure(Measure):
    """Block source -> target attention in a window of layers; the change of the predicted token's probability."""

    name = "flow"
    help = "windowed attention knockout read at the prediction"
    question = "which prompt units carry what the model predicts?"
    columns = FLOW_COLUMNS
    series_column, series_label = "flow", "flow"
    rows = {"label": "window centre", "short": "centre", "axis": "decoder layer"}
    units_listed = False  # a flow's sources may be named groups, which the metadata's unit list does not hold
    curves = "series"  # every flow across the window centres, as in both papers' figures
    normalise = "step"  # one scale across window centres: a one-column flow (image->question) still varies
    metrics = (Metric("rel_change", "relative change of p (%)", "rel_change_pct", unit="%", signed=True),
               Metric("delta_logprob", "change of log p", "delta_logprob", unit="nats", signed=True),
               Metric("kl", "KL(base || blocked), nats", "kl", unit="nats"),
               Metric("prob", "probability of the predicted token", "prob"))
    details = (("window_start", "window from layer"), ("window_end", "window to layer"), ("base_prob", "base p"),
               ("target_token", "target"), ("predicted_token", "predicted"), ("new_top1_token", "top-1 when blocked"))

    @dataclass
    class Options:
        flows: tuple = option((), f"with --measure flow: block attention from SRC to DST (default {DEFAULT_FLOW}); "
                              "groups: last, image, image:K, text, question, generated, units, A-B, text:\"...\"",
                              kind="repeat", metavar="SRC->DST", flag="--flow", without="refuse",
                              per_row=True)
        window: int = option(9, "with --measure flow: layers blocked around each layer", type=int)

    # -- the declaration ------------------------------------------------------------------
    @classmethod
    def settle(cls, values: dict) -> None:
        values["flows"] = tuple(values.get("flows") or ()) or (DEFAULT_FLOW,)

    @classmethod
    def checks(cls, s) -> list:
        """The window and each flow checked on its own, so that a config lists every problem of a prompt."""
        from ..fields import no_repeats, parses

        def window():
            if s.window < 1:
                raise UsageError(f"--window must be at least 1 (got {s.window})")

        def flow(spec):
            pair = FlowPair.parse(spec)
            for group in (pair.source, pair.target):
                video = group.name in ("video", "frame", "frames")
                if group.needs_image and not (s.videos if video else s.images):
                    raise UsageError(f"--flow {pair.name} names {'video' if video else 'image'} tokens but the "
                                     f"prompt has no {'--video' if video else '--image'}")

        def repeats():  # among the flows that parse (the others are said by their own check)
            no_repeats([spec for spec in s.flows if parses(FlowPair.parse, spec)], FlowPair.parse, "--flow")

        return [("window", window), *[("flows", lambda spec=spec: flow(spec)) for spec in s.flows],
                ("flows", repeats)]

    @classmethod
    def ignores(cls, s, key: str) -> str | None:
        from ..fields import parses

        if key in UNIT_OPTIONS and not any(parses(FlowPair.parse, f) and FlowPair.parse(f).source.name == "units"
                                           for f in s.flows):
            return "makes the units of a flow from units, and no --flow has units as its source"
        return None

    @classmethod
    def describe(cls, settings, plan, loaded=None) -> str:
        target = "" if parse_target(settings.target) is None else f"; target {settings.target}"
        return f"flow: {', '.join(FlowPair.parse(f).name for f in settings.flows)}; window {settings.window} " \
               f"layers{target}"

    @classmethod
    def check_plan(cls, plan, settings) -> None:
        flow_plan(plan, settings)

    # -- the run (flow.FlowEngine) -----------------------------------------------------------
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from ..flow import FlowEngine

        self.engine = FlowEngine(*args, **kwargs)

    def capture_options(self) -> dict:
        return {"keep_keys_values": True}

    def finish(self, capture, generated: list, progress: bool) -> None:
        self.engine.finish(capture, generated, progress)

    def table(self, token_map):
        import pandas as pd

        frame = self.engine.table(token_map)  # None: no source unit at any step
        return pd.DataFrame({c: [] for c in self.columns}) if frame is None else frame[self.columns]

    def rows_explained(self, steps: int) -> str:
        return self.engine.rows_explained(steps)

    def metadata(self) -> dict:
        return self.engine.metadata()

    @classmethod
    def in_study(cls, metadata: dict, per_row: dict) -> tuple:
        """'text:"{subject}"->last' for each row's 'text:"Eiffel Tower"->last' (the unit column keeps the row's
        own span); the metadata keeps each example's flows as example_flows."""
        if not per_row.get("flows") or "flows" not in metadata:
            return metadata, {}

        def name(spec: str) -> str:
            try:
                return FlowPair.parse(spec).name
            except UsageError:  # a placeholder the parser does not take: the option as written
                return spec

        names = [name(spec) for spec in per_row["flows"]]
        return ({**metadata, "flows": names, "example_flows": metadata["flows"]},
                dict(zip(metadata["flows"], names)))

    def check(self, capture, k: int, table) -> dict:
        return self.engine.check(capture, k, table)
