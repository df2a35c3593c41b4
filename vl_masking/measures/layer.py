"""The layer measure: hide each unit from one layer's attention and measure how far that layer's update at the
last position moves (the engine: knockout.py; the reference: reference.reference_error).

Variants: Full (the layer's residual update, attention + MLP), Attn (the attention block's output after
o_proj) and Head_h (head h's output before o_proj). Metrics: the L2 and cosine distance between the
unmasked and the masked vector, and the L2 distance relative to the unmasked vector's norm.
"""

from dataclasses import dataclass

from ..fields import option
from .base import Measure, Metric, register
from .tables import per_step_rows, variant_names, variant_table, written_values

VARIANT_GROUPS = ("Full", "Attn", "Heads")
LAYER_COLUMNS = ["generation_step", "layer", "token_position", "token_masked", "token_type", "image_index",
                 "grid_row", "grid_col", "variant", "l2_distance", "cosine_distance", "unit", "unit_kind",
                 "unit_size", "unit_positions", "grid_rows", "grid_cols", "base_norm"]
# the distances of an unmasked and a masked vector (this measure's and the encoder measure's)
DISTANCE_METRICS = (Metric("l2", "L2 distance", "l2_distance"),
                    Metric("cos", "cosine distance", "cosine_distance"),
                    Metric("rel_l2", "relative L2 (L2 / base norm)", ratio=("l2_distance", "base_norm")))


@register
class LayerMeasure(Measure):
    """Hide each unit from one layer's attention; distances of that layer's update at the last position."""

    name = "layer"
    help = "each layer's update at the last position with a unit hidden"
    columns = LAYER_COLUMNS
    series_column, series_label = "variant", "variant"
    normalise = "layer"  # each layer's update has its own size: compare units within a layer
    metrics = DISTANCE_METRICS

    @dataclass
    class Options:
        variants: tuple = option(VARIANT_GROUPS, f"with --measure layer: any of {','.join(VARIANT_GROUPS)}",
                                 kind="csv", choices=VARIANT_GROUPS)

    # -- the run --------------------------------------------------------------------------
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []  # (step, layer, {group: (l2, cos)}, {group: base norm})
        self.tails = {}

    def capture_options(self) -> dict:
        return {"on_layer": True, "keep_layer_inputs": self.settings.check > 0}

    def on_layer(self, step: int, layer: int, pending: dict, length: int) -> None:
        from ..knockout import LayerTail, attention_layer, measure_layer

        attention = pending["attention"]
        if layer not in self.tails:
            self.tails[layer] = LayerTail(attention_layer(self.loaded.model, layer))
        hide = self.plan.hide_mask(step, pending["last_query"].q.device)
        values, norms = measure_layer(pending["last_query"], hide, pending["x_last"], attention, self.tails[layer],
                                      self.settings.variants, self.memory_budget_bytes)
        self.records.append((step, layer, values, norms))

    def table(self, token_map):
        """One row per (generation_step, layer, unit, variant), built without per-row Python."""
        import torch

        if not self.records:
            return variant_table([], [], [], self.columns)
        steps = max(r[0] for r in self.records) + 1
        units = self.plan.units(steps - 1, token_map.text)  # every step's units are a prefix of these
        names = variant_names(self.settings.variants, self.loaded.text_config.num_attention_heads)
        entries = []
        for step, layer, values, norms in self.records:
            groups = list(values)
            n = values[groups[0]][0].shape[-1]
            stack = lambda i: torch.cat([values[g][i].reshape(-1, n) for g in groups]).cpu().numpy()  # noqa: E731
            norm = torch.cat([norms[g].reshape(-1) for g in groups]).cpu().numpy()
            entries.append((step, layer, {"l2_distance": stack(0), "cosine_distance": stack(1),
                                          "base_norm": norm[:, None].repeat(n, axis=1)}))
        return variant_table(entries, units, names, self.columns)

    def rows_explained(self, steps: int) -> str:
        variants = len(variant_names(self.settings.variants, self.loaded.text_config.num_attention_heads))
        return per_step_rows(self.plan, steps, len(self.layers), variants, "variants")

    def metadata(self) -> dict:
        return {"variants": list(self.settings.variants)}

    def check(self, capture, k: int, table) -> dict:
        """Recompute k distinct random (step, layer, unit) results with the reference layer re-run and compare
        them with the table's rows."""
        from ..reference import check_draws, reference_error

        checked = []
        for index, unit in check_draws([self.plan.unit_count(r[0]) for r in self.records], k):
            step, layer = self.records[index][:2]
            written = written_values(table, step, layer, ("l2_distance", "cosine_distance"))
            error = reference_error(self.loaded.model, capture, self.plan, step, layer, written, [unit])
            checked.append({"step": step, "layer": layer, "unit": unit,
                            "positions": list(self.plan.units(step)[unit].positions), "max_error": error})
        return {"checked": checked, "max_error": max(c["max_error"] for c in checked)}
