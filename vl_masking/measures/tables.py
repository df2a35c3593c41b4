"""Table helpers the per-variant measures share (layer, attention): the variant names, the long table of
(step, layer, unit, variant) rows, its inverse for --check, and the row-count line.

Nothing here imports torch or pandas at import time: the measures' declarations are read before a model loads.
"""


def variant_names(groups, num_heads: int) -> list:
    names = []
    for g in groups:
        names.extend([f"Head_{h}" for h in range(num_heads)] if g == "Heads" else [g])
    return names


def per_step_rows(plan, steps: int, layers: int, per_unit: int, what: str) -> str:
    """'2160 = 3 steps x 4 layers x 30 units x 6 variants' (units per step may grow with generated tokens)."""
    counts = [plan.unit_count(s) for s in range(steps)]
    total = sum(counts) * layers * per_unit
    if len(set(counts)) <= 1:
        return (f"{total} = {steps} step{'s' if steps != 1 else ''} x {layers} layers x "
                f"{counts[0] if counts else 0} units x {per_unit} {what}")
    return f"{total} = {layers} layers x {per_unit} {what} x ({' + '.join(map(str, counts))}) units over {steps} steps"


def variant_table(entries, units, names, columns):
    """The long table of a per-variant measure: entries are (step, layer, {column: (V, N) values}), V the
    variants `names` and N the step's units (a prefix of `units`); one row per (step, layer, unit, variant)."""
    import numpy as np
    import pandas as pd

    from ..units import unit_columns

    if not entries:
        return pd.DataFrame({c: [] for c in columns})
    parts = {k: [] for k in ("step", "layer", "unit", "variant")}
    values = {c: [] for c in entries[0][2]}
    for step, layer, arrays in entries:
        v, n = next(iter(arrays.values())).shape
        parts["step"].append(np.full(n * v, step, dtype=np.int32))
        parts["layer"].append(np.full(n * v, layer, dtype=np.int32))
        parts["unit"].append(np.repeat(np.arange(n), v))
        parts["variant"].append(np.tile(np.arange(v, dtype=np.int32), n))
        for column, array in arrays.items():
            values[column].append(np.asarray(array).T.reshape(-1))  # unit-major, variants within
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return pd.DataFrame({
        "generation_step": joined["step"], "layer": joined["layer"], **unit_columns(units, joined["unit"]),
        "variant": pd.Categorical.from_codes(joined["variant"], names),
        **{c: np.concatenate(v).astype(np.float32) for c, v in values.items()},
    })[columns]


def written_values(table, step: int, layer: int, columns) -> dict:
    """The inverse of variant_table for one (step, layer): {variant: {column: (N,) values}} as the table holds
    them (what --check compares with the reference is what the files say)."""
    import numpy as np

    rows = table[(table["generation_step"].to_numpy() == step) & (table["layer"].to_numpy() == layer)]
    variants = rows["variant"].astype(str).to_numpy()
    return {v: {c: np.asarray(rows[c].to_numpy()[variants == v], dtype=np.float64) for c in columns}
            for v in dict.fromkeys(variants)}
