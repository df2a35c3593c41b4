"""The encoder-flow measure: which parts of the picture the answer needs, read at the prediction. For each picture
unit and each window of vision blocks, the unit's patches are hidden from every query's attention in the window's
blocks; the rest of the tower, the merger or projector and the language model run, and the prediction at step 0
is read with the flow measure's metrics (engine: encoder_flow.py; reference: reference.reference_encoder_flow).

Series (the `flow` column): `knockout`, one row per (window centre, unit), `layer` the centre block and
`window_start`/`window_end` the blocks hidden; and the pre-fusion ablation of Neo et al. (ICLR 2025), `mean after
projector` and `zero after projector`: the unit's image tokens (and Qwen3-VL's DeepStack rows for them) replaced by
their picture's mean image token or by zero after the projector, one row per unit, at `layer` = the number of
blocks (after the tower).
"""

from dataclasses import dataclass

from ..errors import UsageError
from ..fields import option
from .base import register
from .encoder import EncoderMeasure
from .flow import FLOW_COLUMNS, FlowMeasure

SERIES = ("knockout", "mean after projector", "zero after projector")


@register
class EncoderFlowMeasure(EncoderMeasure):
    """Hide each picture unit in a window of vision blocks (or replace its image tokens after the projector); the
    change of the prediction."""

    name = "encoder-flow"
    help = "a picture unit hidden in a window of vision blocks (or replaced after the projector), read at the prediction"
    question = "which parts of the picture, mixed in which vision blocks, carry what the model predicts?"
    columns = FLOW_COLUMNS
    series_column, series_label = "flow", "ablation"
    rows = {"label": "window centre (vision block; the last: after the projector)", "short": "block", "axis": "vision block"}
    units_listed = True
    curves = "units"
    normalise = "step"
    metrics = FlowMeasure.metrics
    details = FlowMeasure.details
    uses = ("encoder_layers",)

    @dataclass
    class Options:
        encoder_window: int = option(3, "with --measure encoder-flow: vision blocks hidden around each block "
                                        "(clipped at the tower's ends)", type=int)

    @classmethod
    def checks(cls, s) -> list:
        def window():
            if s.encoder_window < 1:
                raise UsageError(f"--encoder-window must be at least 1 (got {s.encoder_window})")
        return [("encoder_window", window)]

    @classmethod
    def describe(cls, settings, plan, loaded=None) -> str:
        return super().describe(settings, plan, loaded).replace("encoder:", "encoder-flow:", 1) + \
            f"; window {settings.encoder_window} blocks; target {settings.target}"

    # -- the run --------------------------------------------------------------------------
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results = []  # (series code, centre, start, end, metrics of every unit)

    def finish(self, capture, generated, progress) -> None:
        import torch

        from ..console import progress as console_progress
        from ..encoder_flow import replaced_after_projector, window_knockout
        from ..flow import window_of
        from ..targets import step_logits, step_targets
        from ..tower import image_positions

        kwargs = self.load_tower()
        self.kwargs = kwargs
        depth = len(self.tower.blocks)
        self.base_logits = step_logits(self.loaded, capture, 0)
        self.target = step_targets(self.loaded, capture, generated, self.settings.target,
                                   self.inputs.input_ids[0])[0]
        self.predicted = generated[0] if generated else int(self.base_logits.argmax())
        target = self.target["target_token_id"]
        chunk = max(1, self.memory_budget_bytes // max(1, self._forward_bytes()))
        last = max(self.tower.measured) + 1  # blocks after it never reach the language model
        # the language model's prompt attention as in the unblocked run
        blocks = torch.from_numpy(self.inputs.tokens.picture_index) if self.plan.bidirectional else None
        self.decoder_blocks = blocks
        bar = console_progress(len(self.blocks) + 2, "encoder-flow windows", "window", enabled=progress)
        with torch.no_grad():
            for centre in self.blocks:
                window = window_of(centre, self.settings.encoder_window, last)
                metrics = window_knockout(self.loaded, kwargs, blocks, self.tower, self.record, self.cells,
                                          range(window.start, window.end + 1), self.base_logits, target, chunk)
                self.results.append((0, centre, window.start, window.end, metrics))
                bar.update(1)
            positions = [torch.tensor(u.positions) for u in self.units]
            pictures = [torch.tensor(p) for p in image_positions(self.inputs.tokens)]
            for code, mode in ((1, "mean"), (2, "zero")):
                metrics = replaced_after_projector(self.loaded, kwargs, blocks, self.tower, self.record, positions,
                                                   pictures, mode, self.base_logits, target, chunk)
                self.results.append((code, depth, depth, depth, metrics))
                bar.update(1)
        bar.close()

    def _forward_bytes(self) -> int:
        """About what one copy of the prompt holds during a forward: the language model's activations."""
        config = self.loaded.text_config
        return 4 * self.inputs.prompt_length * config.hidden_size * 8

    def table(self, token_map):
        import numpy as np

        from ..flow import step0_frame

        every = np.arange(len(self.units))
        rows = [(code, centre, start, end, every, m) for code, centre, start, end, m in self.results]
        return step0_frame(self.loaded.tokenizer, rows, list(SERIES), self.units, self.target, self.predicted)

    def series_order(self, table) -> list:
        return list(SERIES)

    def rows_explained(self, steps: int) -> str:
        n = len(self.units)
        return (f"{n * (len(self.blocks) + 2)} = {n} picture units x ({len(self.blocks)} windows + 2 after the "
                "projector) (at step 0)")

    def metadata(self) -> dict:
        return {"encoder_layers": list(self.blocks), "encoder_window": self.settings.encoder_window,
                "vision_blocks": len(self.tower.blocks) if self.tower else None}

    def check(self, capture, k: int, table) -> dict:
        """Recompute k distinct random (series, window, unit) results with one full forward of the model each, the
        window's vision attention through the reference's own float64 key mask, and compare the metrics."""
        from ..reference import check_draws, reference_encoder_flow
        from ..tower import image_positions

        checked = []
        kwargs = self.kwargs
        for index, unit in check_draws([len(self.units)] * len(self.results), k):
            code, centre, start, end, _ = self.results[index]
            expected = reference_encoder_flow(self.loaded.model, kwargs, self.tower, self.record, SERIES[code],
                                              self.cells[unit], range(start, end + 1), self.units[unit].positions,
                                              image_positions(self.plan.tokens), self.target["target_token_id"],
                                              self.decoder_blocks)
            row = table[(table["flow"].astype(str) == SERIES[code]) & (table["layer"] == centre)
                        & (table["token_position"] == self.units[unit].first)].iloc[0]
            error = max(abs(float(row.prob) - expected["prob"]), abs(float(row.delta_logprob) - expected["delta_logprob"]),
                        abs(float(row.kl) - expected["kl"]))
            checked.append({"step": 0, "layer": centre, "unit": unit, "series": SERIES[code],
                            "positions": list(self.units[unit].positions), "max_error": error})
        return {"checked": checked, "max_error": max(c["max_error"] for c in checked)}
