"""Figures from result files (never by re-running a model): matplotlib, headless.

reading.py (files to checked Results), averages.py (several prompts: means and intervals), drawing.py
(the figures), command.py (the command line).

    python -m vl_masking.figures output/demo.parquet --image examples/piggy.png --out figs/
    python -m vl_masking.figures output/*.parquet --out figs/ --name batch     # several prompts: aggregate

For one file: (1) the image under its heat for every layer (small multiples, one colour
bar), (2) the layer x unit heatmap, (3) for flow files the curves of every flow across
layers, (4) one layer's heads. For several files: the per-layer mean over prompts with a
95% percentile-bootstrap interval (the prompts resampled) for text and image units, or for
each flow, and the table NAME.summary.parquet / .csv (layer, group, mean, low, high, n).
Every figure carries a caption line: model, prompt, step, variant or flow, metric,
normalisation.
"""

from .averages import mean_interval, summarise
from .command import command, main
from .drawing import DPI, PICTURE_MODES, heads, heatmap, layer_multiples, load_picture, mapped_view, scatter, \
    series_curves
from .reading import Result, load, load_study, unit_values
from ..reader_rules import spearman

__all__ = ["DPI", "PICTURE_MODES", "Result", "command", "heads", "heatmap", "layer_multiples", "load", "load_picture",
           "load_study", "main", "mapped_view", "mean_interval", "scatter", "series_curves", "spearman", "summarise",
           "unit_values"]
