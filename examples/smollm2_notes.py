"""What to look at in the demo's SmolLM2 run, worked out from its two result files (nothing is typed in by hand):

    python examples/smollm2_notes.py output/demo_smollm2.flow.parquet output/demo_smollm2.layer.parquet

`make demo` prints these lines; docs/real-model.md quotes them, and tests/test_real_model.py checks that the page's
sentences are the ones this script writes for a fresh run of the demo's command.
"""

import sys

import pandas as pd

DROP = 30.0  # a window "lowers p" when the change is below -30 %: well outside the few-percent wiggle elsewhere


def longest_run(layers: list) -> list:
    """The longest run of consecutive layers in a sorted list."""
    best, run = [], []
    for layer in layers:
        run = run + [layer] if run and layer == run[-1] + 1 else [layer]
        best = run if len(run) > len(best) else best
    return best


def flow_note(flow: pd.DataFrame, unit: str, name: str) -> str:
    """Where blocking `unit` from the last position lowers the target's probability by more than DROP %."""
    rows = flow[flow.unit.astype(str) == unit].set_index("layer").rel_change_pct
    run = longest_run(sorted(int(layer) for layer, change in rows.items() if change < -DROP))
    if not run:
        return f"Blocking {name} from the last position never lowers p by more than {DROP:.0f}%."
    inside = -rows.loc[run]
    outside = rows.drop(index=run).abs().max()
    return (f"Blocking {name} from the last position lowers p({target(flow)}) by {inside.min():.0f}-"
            f"{inside.max():.0f}% in the windows centred on layers {run[0]}-{run[-1]}, and moves it by at most "
            f"{outside:.0f}% in the other windows.")


def layer_note(layer: pd.DataFrame, unit: str, name: str) -> str:
    """From which layer on hiding `unit` moves the attention output most (relative L2), and how often."""
    attn = layer[layer.variant.astype(str) == "Attn"].assign(rel=lambda t: t.l2_distance / t.base_norm)
    top = attn.loc[attn.groupby("layer").rel.idxmax()].set_index("layer").unit.astype(str)
    layers = sorted(int(x) for x in top.index)
    start = next(x for x in layers if (top.loc[x:] == unit).mean() >= 0.9)  # from here on, nearly always first
    later = attn[attn.layer >= start]
    mine, others = later[later.unit.astype(str) == unit], later[later.unit.astype(str) != unit]
    first = int((top.loc[start:] == unit).sum())
    return (f"Hiding {name} moves the attention block's output most in {first} of the {len(layers) - layers.index(start)} "
            f"layers from layer {start} on (relative L2 up to {mine.rel.max():.1f}; every other unit moves it by "
            f"at most {others.rel.max():.2f} there).")


def target(flow: pd.DataFrame) -> str:
    return str(flow.target_token.iloc[0]).strip()


def notes(flow: pd.DataFrame, layer: pd.DataFrame) -> list:
    return [flow_note(flow, "Eiffel Tower", "the subject `Eiffel Tower`"),
            flow_note(flow, " Eiffel", "`Eiffel` alone"),
            flow_note(flow, "The", "the first token `The` (the attention sink)"),
            layer_note(layer, "The", "the first token `The`")]


if __name__ == "__main__":
    for line in notes(pd.read_parquet(sys.argv[1]), pd.read_parquet(sys.argv[2])):
        print(line)
