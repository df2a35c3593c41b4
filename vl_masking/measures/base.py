"""The measure interface (Measure), a metric's description (Metric) and the registry (MEASURES, register).

The package's __init__ describes what a measure declares; this module imports nothing heavy.
"""


from dataclasses import asdict, dataclass, fields

MEASURES = {}  # name -> class, in registration order (the order of --measure's choices and of a run's files)


def register(cls):
    MEASURES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Metric:
    """One metric of a measure, as figures and viewers show it."""

    key: str  # the short name figures' --metric and the viewers' menus use
    label: str
    column: str | None = None  # the table column; None for a ratio the reader computes
    unit: str = ""
    signed: bool = False  # values of both signs: a diverging colour scale centred on zero
    ratio: tuple | None = None  # (numerator column, denominator column); 0/0 reads 0, x/0 NaN

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


class Measure:
    """The interface. Class attributes and classmethods are the declaration (no model needed); an instance is
    made per run, with the loaded model, the prompt and the plan."""

    name = ""
    help = ""  # one line for --measure's help
    question = "which prompt units does each layer use?"  # what a view of its files answers (a viewer's title)
    columns: list = []
    series_column = ""  # the column that tells a row's kind within a layer and unit (variant, flow)
    series_label = ""
    # what a row of the layer x unit table is; its axis: what its number counts (two measures' rows are compared
    # number by number only on one axis: a decoder layer, a vision block)
    rows = {"label": "layer", "short": "layer", "axis": "decoder layer"}
    normalise = "layer"  # the default normalisation: layer, step or global
    metrics: tuple = ()  # Metric, the default first
    details: tuple = ()  # (column, label) shown next to a value: the target token of a flow
    Options = None  # a dataclass of fields.option() fields that this measure declares
    uses: tuple = ()  # options another measure declares that this one reads too (encoder-flow: --encoder-layers)
    units_listed = True  # the table's units are the metadata's unit list (a viewer reads them from there)
    curves = "units"  # across layers, figures and viewers draw the chosen series' image and text units, or
    #                   "series": one curve per series (every flow)

    # -- the declaration ------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list:
        return [f.name for f in fields(cls.Options)] if cls.Options else []

    @classmethod
    def settle(cls, values: dict) -> None:
        """Fill in what this measure derives from the other options (in place, before validation)."""

    @classmethod
    def checks(cls, settings) -> list:
        """(option, check) pairs for this measure's options; each check raises UsageError."""
        return []

    @classmethod
    def ignores(cls, settings, key: str) -> str | None:
        """Why a run of this measure does not use the common option `key` (None: it uses it)."""
        return None

    @classmethod
    def check_model(cls, loaded, settings) -> None:
        """UsageError for what this measure cannot do with this model (its config, tokenizer and family are
        loaded; its weights not yet)."""

    @classmethod
    def check_plan(cls, plan, settings) -> None:
        """UsageError for what this measure's options ask of the tokenized prompt (a --flow's span past its end),
        before the weights are read."""

    @classmethod
    def describe(cls, settings, plan, loaded=None) -> str | None:
        """The console line of this measure's own settings, if any (loaded: the model, its weights read)."""
        return None

    @classmethod
    def schema(cls, series_order=()) -> dict:
        """What a reader of a result file needs to show it, written into its metadata."""
        return {"measure": cls.name, "question": cls.question, "series": {"column": cls.series_column, "label": cls.series_label,
                                                "order": list(series_order)},
                "rows": dict(cls.rows), "normalise": cls.normalise, "metrics": [m.to_dict() for m in cls.metrics],
                "details": [list(d) for d in cls.details], "curves": cls.curves, "units_listed": cls.units_listed,
                "options": cls.option_names(),
                "columns": list(cls.columns)}

    # -- the run --------------------------------------------------------------------------
    def __init__(self, loaded, inputs, plan, settings, layers: list, memory_budget_bytes: int):
        self.loaded, self.inputs, self.plan, self.settings = loaded, inputs, plan, settings
        self.layers = layers
        self.memory_budget_bytes = memory_budget_bytes

    def capture_options(self) -> dict:
        """What the Capture of the unblocked generation records for this measure: keep_layer_inputs,
        keep_keys_values (booleans), and whether on_layer is called for each measured layer."""
        return {}

    def on_layer(self, step: int, layer: int, pending: dict, length: int) -> None:
        """A measured layer has run (only when capture_options asks for it)."""

    def finish(self, capture, generated: list, progress: bool) -> None:
        """Work left after generation (all of it, for flow)."""

    def table(self, token_map):
        """The result table (pandas DataFrame with `columns`)."""
        raise NotImplementedError

    def rows_explained(self, steps: int) -> str:
        """'2160 = 3 steps x 4 layers x 30 units x 6 variants': the row count and its factors."""
        raise NotImplementedError

    def metadata(self) -> dict:
        """This measure's own metadata keys (a study's files keep them from the first example: the same for all)."""
        return {}

    @classmethod
    def in_study(cls, metadata: dict, per_row: dict) -> tuple:
        """(an example's metadata as a study writes it, {a row's series value: the study's}). per_row: the
        options whose {placeholders} each row fills in, as the study was given them; a measure whose series
        names them (a flow from 'text:"{subject}"') names its series as written, so that every example's rows
        of one series are one series of the study."""
        return metadata, {}

    def series_order(self, table) -> list:
        column = table[self.series_column]
        return [str(c) for c in (column.cat.categories if hasattr(column, "cat") else dict.fromkeys(column))]

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
                "series": self.series_column,
                "where": sorted({str(x) for x in table[self.series_column][rows]})}

    def check(self, capture, k: int, table) -> dict:
        """Recompute k distinct random results (reference.check_draws) with the reference method and compare
        them with the rows of `table`, the table as it is written; {'checked': [...], 'max_error': e}."""
        raise NotImplementedError


def schema_of(meta: dict) -> dict | None:
    """The schema a result file's metadata holds; for a file written before schemas, its measure's schema now."""
    if isinstance(meta.get("schema"), dict):
        return meta["schema"]
    cls = MEASURES.get(meta.get("measure") or "layer")
    return cls.schema() if cls else None

