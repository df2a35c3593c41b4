"""Measures: each way of measuring what a prompt unit does is one registered class, the only extension point.

    layer      (layer.py)      hide a unit from one layer's attention; how far that layer's update moves
    flow       (flow.py)       block attention from a source to a target in a window of layers; the
                               change of the prediction
    attention  (attention.py)  the unblocked attention of the last query on each unit: its weight and
                               the norm of its contribution to the attention output
    encoder    (encoder.py)    hide a picture unit from one vision-tower block's attention; how far the
                               block's update over the picture's queries moves
    encoder-flow (encoder_flow.py) hide a picture unit in a window of vision blocks, or replace its image
                               tokens after the projector; the change of the prediction
    deepstack  (deepstack.py)  remove a DeepStack level's features (Qwen3-VL) at a picture unit; the change of
                               the prediction, and the level's norm relative to the residual stream

A measure class declares, in one place, everything the rest of the tool needs to know about it:

* its own options (an `Options` dataclass of fields.option() fields: parser flags, config keys
  and API keywords are made from them), what it fills in (`settle`), what it checks (`checks`)
  and which common options it does not use in a run (`ignores`);
* its columns, and its *schema*: the series column (variant, flow), what a row of the layer x
  unit table is (a layer, a window centre), the metrics with label, unit, sign and default
  normalisation, and the detail columns. The schema is written into every result's metadata;
  figures.py and both viewers read it from the file, and never test a measure's name;
* its console line (`describe`) and its row count (`rows_explained`);
* how it runs: what the Capture of the unblocked generation records for it, the work during
  (`on_layer`) or after (`finish`) the generation, its table, metadata and `check` against the
  reference.

Nothing here imports torch, so that a bad command line is refused before it loads. A measure's
work imports its engine (knockout.py, flow.py) when it runs.
"""

from .base import MEASURES, Measure, Metric, register, schema_of
from . import layer, flow, attention, encoder, encoder_flow, deepstack  # noqa: E402,F401 - each registers its measure

__all__ = ["MEASURES", "Measure", "Metric", "register", "schema_of"]
