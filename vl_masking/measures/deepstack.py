"""The DeepStack measure (Qwen3-VL): what the features that the vision tower's intermediate blocks add to the
language model's residual stream do for the answer. Per DeepStack level (the vision block its features come from,
the decoder layer they are added after), the level's features removed at each picture unit's image positions and
at every image position, read at the prediction at step 0 with the flow measure's metrics; and the level's
injection norm relative to the residual stream at those positions (a map per level with --mask-unit token).
Engine: deepstack.py; reference: reference.reference_deepstack (full forward passes).

Series (the `flow` column): `removed at the unit` (one row per level and picture unit) and `removed at every
image position` (one row per level, the unit `image`: every image token of the prompt). `layer` is the decoder
layer a level is added after, `vision_block` the block it is taken from.
"""

from ..errors import UsageError
from .base import Measure, Metric, register
from .encoder import require_picture_units
from .flow import FLOW_COLUMNS, FlowMeasure

SERIES = ("removed at the unit", "removed at every image position")
COLUMNS = [c for c in FLOW_COLUMNS if c not in ("window_start", "window_end")]
COLUMNS = COLUMNS[:COLUMNS.index("layer") + 1] + ["vision_block"] + COLUMNS[COLUMNS.index("layer") + 1:] + \
    ["injection_ratio"]


@register
class DeepStackMeasure(Measure):
    """Remove a DeepStack level's features at a unit's image positions; the change of the prediction, and the
    level's norm relative to the residual stream."""

    name = "deepstack"
    help = "Qwen3-VL's DeepStack: each level's features removed at a picture unit, read at the prediction"
    question = "what do the vision features DeepStack adds after the first decoder layers do for the prediction?"
    columns = COLUMNS
    series_column, series_label = "flow", "features"
    rows = {"label": "DeepStack level (after decoder layer)", "short": "level", "axis": "DeepStack level"}
    units_listed = False  # the unit `image` of every image position is not in the metadata's unit list
    curves = "units"
    normalise = "step"
    metrics = (*FlowMeasure.metrics,
               Metric("injection", "injected norm / residual norm", "injection_ratio"))
    details = (("vision_block", "features from vision block"), ("base_prob", "base p"), ("target_token", "target"),
               ("predicted_token", "predicted"), ("new_top1_token", "top-1 when removed"))

    @classmethod
    def check_model(cls, loaded, settings) -> None:
        family = loaded.adapter.family if loaded.adapter else "a text model"
        if loaded.adapter is None or not loaded.adapter.deepstack_levels():
            raise UsageError(f"--measure deepstack reads Qwen3-VL's DeepStack features, and {family} "
                             f"({loaded.config.model_type}) adds none to the language model")

    @classmethod
    def check_plan(cls, plan, settings) -> None:
        require_picture_units(cls.name, plan, settings)

    @classmethod
    def describe(cls, settings, plan, loaded=None) -> str:
        levels = ", ".join(f"vision block {b} after decoder layer {d}" for b, d in loaded.adapter.deepstack_levels())
        units = sum(u.token_type == "vision" for u in plan.units(0))
        return f"deepstack: {levels}; {units} picture units; target {settings.target}"

    # -- the run --------------------------------------------------------------------------
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.levels = self.loaded.adapter.deepstack_levels()
        self.results = []  # (series code, level index, metrics, ratios) per level and series

    def capture_options(self) -> dict:
        return {"keep_keys_values": True}

    def finish(self, capture, generated, progress) -> None:
        import torch

        from ..console import progress as console_progress
        from ..deepstack import DeepStackEngine
        from ..targets import step_logits, step_targets
        from ..units import unit_of_positions

        self.capture, self.generated = capture, generated
        tokens = self.plan.tokens
        self.units = [u for u in self.plan.units(0) if u.token_type == "vision"]
        self.every = unit_of_positions("image", "group", tokens.view_positions, tokens)
        self.base_logits = step_logits(self.loaded, capture, 0)
        self.target = step_targets(self.loaded, capture, generated, self.settings.target, self.inputs.input_ids[0])[0]
        self.predicted = generated[0] if generated else int(self.base_logits.argmax())
        engine = DeepStackEngine(self.loaded, self.plan, capture, self.memory_budget_bytes)
        bar = console_progress(len(self.levels), "DeepStack levels", "level", enabled=progress)
        with torch.no_grad():
            for level, (_, layer) in enumerate(self.levels):
                for code, units in ((0, self.units), (1, [self.every])):
                    configs = [list(u.positions) for u in units]
                    metrics = engine.removed(layer, configs, self.base_logits, self.target["target_token_id"])
                    self.results.append((code, level, metrics, engine.ratios(layer, configs)))
                bar.update(1)
        bar.close()

    def table(self, token_map):
        import numpy as np

        from ..flow import step0_frame

        rows, blocks, ratios = [], [], []
        for code, level, metrics, ratio in self.results:
            block, layer = self.levels[level]
            index = np.arange(len(self.units)) if code == 0 else np.array([len(self.units)])
            rows.append((code, layer, layer, layer, index, metrics))
            blocks.append(np.full(len(index), block, np.int32))
            ratios.append(ratio.numpy())
        frame = step0_frame(self.loaded.tokenizer, rows, list(SERIES), [*self.units, self.every], self.target,
                            self.predicted)
        frame["vision_block"] = np.concatenate(blocks)
        frame["injection_ratio"] = np.concatenate(ratios).astype(np.float32)
        return frame[self.columns]

    def series_order(self, table) -> list:
        return list(SERIES)

    def rows_explained(self, steps: int) -> str:
        n = len(self.units)
        return (f"{len(self.levels) * (n + 1)} = {len(self.levels)} DeepStack levels x ({n} picture units + every "
                "image position) (at step 0)")

    def metadata(self) -> dict:
        return {"deepstack_levels": [{"vision_block": b, "decoder_layer": d} for b, d in self.levels]}

    def check(self, capture, k: int, table) -> dict:
        """Recompute k distinct random (level, series, unit) results with one full forward of the model each, the
        level's rows of the language model's input zeroed at the unit's image positions, and compare them (the
        metrics, and the injection ratio read from that forward's own residual stream)."""
        from ..flow import flow_error, step_forward_kwargs
        from ..reference import check_draws, reference_deepstack

        checked = []
        units = [*self.units, self.every]
        kwargs = step_forward_kwargs(self, 0)
        for index, item in check_draws([len(self.units) if r[0] == 0 else 1 for r in self.results], k):
            code, level, _, _ = self.results[index]
            unit = units[item if code == 0 else len(self.units)]
            block, layer = self.levels[level]
            expected = reference_deepstack(self.loaded.model, kwargs, level, layer, list(unit.positions),
                                           self.target["target_token_id"], capture.vision_blocks,
                                           capture.sliding_windows)
            row = table[(table["flow"].astype(str) == SERIES[code]) & (table["layer"] == layer)
                        & (table["unit_positions"].astype(str) == ",".join(map(str, unit.positions)))].iloc[0]
            ours = {k: float(row[k]) for k in ("prob", "delta_logprob", "kl", "rel_change_pct", "base_prob")}
            ratio = abs(float(row.injection_ratio) - expected["ratio"]) / max(expected["ratio"], 1e-30)
            checked.append({"step": 0, "layer": layer, "unit": unit.label, "series": SERIES[code],
                            "max_error": max(flow_error(ours, expected), ratio)})
        return {"checked": checked, "max_error": max(c["max_error"] for c in checked)}
