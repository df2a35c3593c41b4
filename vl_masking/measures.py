"""Measures: each way of measuring what a mask unit does is one registered class behind one interface.

`layer` (knockout.py): hide a unit from one layer's attention and measure how far that
layer's update at the last position moves. `flow` (flow.py): block attention edges from a
source to a target in a window of layers and read the change of the prediction.

The analysis (analysis.py) runs generation under a Capture set up as the measure asks,
lets the measure work during or after it, and asks it for its table, metadata and check.
"""

from abc import ABC, abstractmethod

MEASURES = {}


def register(name: str):
    def decorate(cls):
        cls.name = name
        MEASURES[name] = cls
        return cls
    return decorate


class Measure(ABC):
    """The interface. A measure is made per run, with the loaded model, the prompt and the plan."""

    name = ""
    columns: list = []
    series_column = ""  # the column that tells a row's kind within a layer and unit (variant, flow)

    def __init__(self, loaded, inputs, plan, settings, layers: list, memory_budget_bytes: int):
        self.loaded, self.inputs, self.plan, self.settings = loaded, inputs, plan, settings
        self.layers = layers
        self.memory_budget_bytes = memory_budget_bytes

    def capture_options(self) -> dict:
        """Keyword arguments for the Capture that records the unblocked generation."""
        return {}

    def finish(self, capture, generated: list, progress: bool) -> None:
        """Work left after generation (all of it, for flow)."""

    @abstractmethod
    def table(self, token_map):
        """The result table (pandas DataFrame with `columns`)."""

    @abstractmethod
    def rows_explained(self, steps: int) -> str:
        """'2160 = 3 steps x 4 layers x 30 units x 6 variants': the row count and its factors."""

    def metadata(self) -> dict:
        return {}

    def non_finite(self, table) -> dict | None:
        """Where the table holds NaN or +-inf (a float16 overflow): counts per column, layers, series; or None."""
        import numpy as np

        floats = [c for c in self.columns if c in table and table[c].dtype.kind == "f"]
        bad = {c: ~np.isfinite(table[c].to_numpy()) for c in floats}
        counts = {c: int(m.sum()) for c, m in bad.items() if m.any()}
        if not counts:
            return None
        rows = np.logical_or.reduce(list(bad.values()))
        nan = sum(int(np.isnan(table[c].to_numpy()).sum()) for c in counts)
        return {"count": sum(counts.values()), "nan": nan, "inf": sum(counts.values()) - nan, "columns": counts,
                "rows": int(rows.sum()), "layers": sorted({int(x) for x in table["layer"].to_numpy()[rows]}),
                self.series_column: sorted({str(x) for x in table[self.series_column][rows]})}

    @abstractmethod
    def check(self, capture, k: int) -> dict:
        """Recompute k random results with the reference method; {'checked': [...], 'max_error': e}."""
