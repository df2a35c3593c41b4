"""The encoder measure: the seed's method inside the vision tower. For each vision block and each picture unit
(the patches under one language-model token, a region, the whole picture), hide the unit's patches from that
block's attention for every query of the picture, and measure how far the block's update moves (the engine:
encoder_knockout.py; the reference: reference.reference_encoder).

Rows: one per (vision block, unit, variant), at generation step 0 (the tower runs once, before any token is
generated). Variants: Full (the block's update), Attn (the attention block's output) and Head_h (head h of the
tower before the projection), each over all of the picture's queries and, as "... outside", over the queries
outside the unit (what the rest of the picture takes from it). A unit of text tokens has no patches: the
measure keeps the picture units of --mask-unit.
"""

from dataclasses import dataclass

from ..errors import UsageError
from ..fields import layer_ranges, option, parse_layers
from .base import Measure, register
from .layer import DISTANCE_METRICS, LAYER_COLUMNS
from .tables import variant_table, written_values


def _check_blocks(spec) -> None:
    layer_ranges(str(spec), "--encoder-layers")


def require_picture_units(name: str, plan, settings) -> None:
    """A measure of picture units (the encoder measures, DeepStack) needs a picture and units of it."""
    if not settings.images and not settings.videos:
        raise UsageError(f"--measure {name} hides parts of a picture: give an --image or a --video")
    if not any(u.token_type == "vision" for u in plan.units(0)):
        raise UsageError(f"--measure {name} hides picture units, and --mask-mode text makes none: use "
                         "--mask-mode vision or both")


@register
class EncoderMeasure(Measure):
    """Hide each picture unit from one vision block's attention; distances of that block's update over the
    picture's queries."""

    name = "encoder"
    help = "each vision-tower block's update over the picture's patches with a unit's patches hidden"
    question = "which parts of the picture does each block of the vision tower mix in?"
    columns = LAYER_COLUMNS
    series_column, series_label = "variant", "variant (queries)"
    rows = {"label": "vision block", "short": "block", "axis": "vision block"}
    normalise = "layer"  # each block's update has its own size: compare units within a block
    metrics = DISTANCE_METRICS

    @dataclass
    class Options:
        encoder_layers: str | None = option(
            None, "with --measure encoder: the vision-tower blocks to measure, e.g. 0-3,20 (default: every block "
            "whose output reaches the language model)", check=_check_blocks)

    @classmethod
    def check_model(cls, loaded, settings) -> None:
        """The family's tower, from its config: refused in one line where the engine cannot reproduce it, and
        --encoder-layers checked against the blocks whose output reaches the language model."""
        if loaded.adapter is None:
            raise UsageError("--measure encoder measures a vision tower: give a vision-language model")
        refusal = loaded.adapter.tower_refusal()
        if refusal:
            raise UsageError(refusal)
        depth, measured, note = loaded.adapter.tower_blocks()
        beyond = sorted(set(parse_layers(settings.encoder_layers, depth, "--encoder-layers", "the tower has blocks"))
                        - set(measured)) \
            if settings.encoder_layers is not None else []
        if beyond:
            raise UsageError(f"--encoder-layers {settings.encoder_layers}: block {beyond[0]} never reaches the language "
                             f"model ({note})")

    @classmethod
    def check_plan(cls, plan, settings) -> None:
        if settings.videos and settings.images:  # the model runs the tower once on each: one pass is recorded
            raise UsageError(f"--measure {cls.name} measures one pass of the vision tower, and the model runs it "
                             "once on the images and once on the videos: give the --image or the --video")
        blended = [view for view in plan.tokens.images if view.blended]
        if blended:
            advice = "" if blended[0].video >= 0 else ": give a smaller picture"
            raise UsageError(f"--measure {cls.name}: the model resamples the grid of {blended[0].label} (each token "
                             f"blends several patches), which the tower measures do not reproduce{advice}")
        require_picture_units(cls.name, plan, settings)

    @classmethod
    def describe(cls, settings, plan, loaded=None) -> str:
        from ..console import ranges

        depth, measured, note = loaded.adapter.tower_blocks()
        blocks = settings.encoder_layers or f"{ranges(measured)} of {depth}"
        line = f"encoder: vision blocks {blocks}; {sum(u.token_type == 'vision' for u in plan.units(0))} picture units"
        return line + (f" (not measured: {note})" if note and settings.encoder_layers is None else "")

    # -- the run --------------------------------------------------------------------------
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []  # (block, {'l2', 'cos', 'base_norm'}: (2, V, N))
        self.tower = self.record = None
        self.blocks = []

    def load_tower(self) -> dict:
        """The tower for the prompt's pictures, the blocks to measure, one recorded pass of it and the picture
        units with their tower tokens; returns the prompt's inputs on the model's device."""
        from ..inputs import to_device
        from ..tower import picture_units, picture_views

        kwargs = to_device(self.inputs, self.loaded)
        self.tower = self.loaded.adapter.tower(self.loaded.model, kwargs, picture_views(self.inputs.tokens))
        self.blocks = (list(self.tower.measured) if self.settings.encoder_layers is None else
                       parse_layers(self.settings.encoder_layers, len(self.tower.blocks), "--encoder-layers",
                                    "the tower has blocks"))
        self.record = self.tower.record(kwargs)
        self.units, self.cells = picture_units(self.plan, self.inputs.tokens, self.tower)
        return kwargs

    def finish(self, capture, generated, progress) -> None:
        from ..console import progress as console_progress
        from ..encoder_knockout import measure_block

        self.load_tower()
        cells = self.cells
        bar = console_progress(len(self.blocks), "vision blocks", "block", enabled=progress)
        for block in self.blocks:
            values = measure_block(self.tower, self.record, block, cells, 2 + self.tower.num_heads,
                                   self.memory_budget_bytes)
            self.records.append((block, values))
            bar.update(1)
        bar.close()

    def variant_names(self) -> list:
        names = ["Full", "Attn", *(f"Head_{h}" for h in range(self.tower.num_heads))]
        return names + [f"{n} outside" for n in names]

    def table(self, token_map):
        import numpy as np

        entries = [(0, block, {"l2_distance": np.concatenate(v["l2"]), "cosine_distance": np.concatenate(v["cos"]),
                               "base_norm": np.concatenate(v["base_norm"])}) for block, v in self.records]
        return variant_table(entries, self.units, self.variant_names(), self.columns)

    def rows_explained(self, steps: int) -> str:
        variants = len(self.variant_names())
        total = len(self.blocks) * len(self.units) * variants
        return (f"{total} = {len(self.blocks)} vision blocks x {len(self.units)} picture units x {variants} "
                "variants (at step 0)")

    def metadata(self) -> dict:
        return {"encoder_layers": list(self.blocks), "vision_blocks": len(self.tower.blocks) if self.tower else None,
                "vision_heads": self.tower.num_heads if self.tower else None}

    def check(self, capture, k: int, table) -> dict:
        """Recompute k distinct random (block, unit) results by re-running the tower's own block with the unit's
        tokens hidden through an additive key mask, and compare them with the table's rows."""
        from ..reference import check_draws, reference_encoder

        names = self.variant_names()
        checked = []
        for index, unit in check_draws([len(self.units)] * len(self.records), k):
            block = self.records[index][0]
            written = written_values(table, 0, block, ("l2_distance", "cosine_distance"))
            expected = reference_encoder(self.tower, self.record, block, self.cells[unit])
            error = 0.0
            for name in names:  # the table's rows of one (block, variant) are in the order of self.units
                l2, cos = expected[name]
                error = max(error, abs(written[name]["l2_distance"][unit] - l2),
                            abs(written[name]["cosine_distance"][unit] - cos))
            checked.append({"step": 0, "layer": block, "unit": unit, "positions": list(self.units[unit].positions),
                            "max_error": float(error)})
        return {"checked": checked, "max_error": max(c["max_error"] for c in checked)}
