"""One run: prompt -> greedy generation recorded step by step -> the measure's table and metadata.

Step s analyses the prompt plus the first s generated tokens: the forward pass that
predicts generated token s. Generation is transformers' own greedy `generate` (so the
tokens are the model's), with the text decoder's attention routed through the
mask_impact function and a Capture recording what the measures ask for. Several
measures share one generation: those that work while each layer runs (layer, attention)
are called from the Capture's layer hook, those that work after it (flow) from what was
recorded. With `--vision-attention bidirectional` the prompt prefill lets each image's
tokens see each other; later steps decode causally over that cache.
"""

import time
import uuid
from dataclasses import dataclass

import pandas as pd
import torch
from .console import progress as console_progress

from . import __version__
from .anatomy import decoder_layers, select_attention
from .capture import Capture
from .targets import step_targets
from .inputs import LoadedModel, PromptInputs, stop_token_ids, to_device
from .measures import MEASURES, Measure
from .fields import parse_layers
from .options import CPU_BUDGET_MB, GPU_BUDGET_MB, RunSettings
from .units import MaskPlan


@dataclass
class Analysis:
    table: pd.DataFrame
    metadata: dict
    capture: Capture  # the unblocked generation's record: what --check and the bench's floor re-run from
    measure: Measure
    plan: MaskPlan


def analyse(loaded: LoadedModel, inputs: PromptInputs, plan: MaskPlan, settings: RunSettings,
            progress: bool = True) -> Analysis:
    """The run of a single measure (settings.measure names one)."""
    return analyse_measures(loaded, inputs, plan, settings, progress)[0]


class Excluded(Exception):
    """--only-correct: the model's greedy first token is not the target's (raised before the measures' work
    after the generation). `target`: the first step's target record."""

    def __init__(self, target: dict):
        super().__init__(f"predicted {target['predicted_token']!r}, the answer's first token is "
                         f"{target['target_token']!r}")
        self.target = target


def analyse_measures(loaded: LoadedModel, inputs: PromptInputs, plan: MaskPlan, settings: RunSettings,
                     progress: bool = True, only_correct: bool = False) -> list:
    """Every measure of settings.measure from one generation: an Analysis each, in that order. only_correct:
    raise Excluded when the greedy first token is not the target's first token."""
    model = loaded.model
    select_attention(model)
    num_layers = len(decoder_layers(model))
    layers = parse_layers(settings.layers, num_layers)
    budget = int(memory_budget_mb(settings, loaded.device) * (1 << 20))
    measures = [MEASURES[name](loaded, inputs, plan, settings, layers, budget) for name in settings.measure]
    blocks = None
    if plan.bidirectional:  # each picture's tokens (all its views) see each other
        blocks = torch.from_numpy(inputs.tokens.picture_index)

    bar = console_progress(settings.num_tokens, "steps", "step", enabled=progress)
    asked = [m.capture_options() for m in measures]
    per_layer = [m for m, options in zip(measures, asked) if options.get("on_layer")]

    def on_layer(step, layer, pending, length):
        for measure in per_layer:
            measure.on_layer(step, layer, pending, length)

    capture = Capture(model, measured_layers=layers if per_layer else (), on_layer=on_layer,
                      vision_blocks=blocks, on_step_done=lambda step: bar.update(1),
                      keep_layer_inputs=any(o.get("keep_layer_inputs") for o in asked),
                      keep_keys_values=any(o.get("keep_keys_values") for o in asked),
                      layer_additions=loaded.adapter.layer_additions if loaded.adapter else None)
    stops = stop_token_ids(loaded)
    started = time.perf_counter()
    try:
        with torch.no_grad(), capture:
            output = model.generate(**to_device(inputs, loaded), max_new_tokens=settings.num_tokens, do_sample=False,
                                    num_beams=1, temperature=None, top_p=None, top_k=None, eos_token_id=stops,
                                    pad_token_id=stops[0] if stops else None)
    finally:
        bar.close()
    final_ids = output[0].cpu()
    generated = final_ids[inputs.prompt_length:].tolist()
    with torch.no_grad():
        targets = step_targets(loaded, capture, generated, settings.target, inputs.input_ids[0])
        if only_correct and targets and not targets[0]["correct"]:
            raise Excluded(targets[0])
        for measure in measures:
            measure.finish(capture, generated, progress)
    _synchronize(loaded.device)
    analysis_s = time.perf_counter() - started

    tokens = inputs.tokens
    token_map = inputs.token_map(loaded.tokenizer, final_ids.numpy(), tokens.layout)
    steps = capture.step + 1
    run_id = uuid.uuid4().hex  # one generation: the same in every file and format of this run
    analyses = []
    for measure in measures:
        table = measure.table(token_map)
        metadata = run_metadata(loaded, inputs, plan, settings, measure, token_map, generated, stops, steps, layers)
        metadata["run_id"] = run_id
        metadata["targets"] = targets
        metadata["schema"] = measure.schema(measure.series_order(table))
        metadata["timings"] = {"analysis_s": round(analysis_s, 4)}
        metadata["non_finite"] = measure.non_finite(table)
        analysis = Analysis(table=table, metadata=metadata, capture=capture, measure=measure, plan=plan)
        if settings.check:
            started = time.perf_counter()
            with torch.no_grad():
                check = measure.check(capture, settings.check, table)
            metadata["check"] = dict(check, seconds=round(time.perf_counter() - started, 3))
        analyses.append(analysis)
    return analyses


def run_metadata(loaded, inputs, plan, settings, measure, token_map, generated, stops, steps, layers) -> dict:
    """What travels with the table: enough to read it, and to re-derive the run."""
    config = loaded.text_config
    return {
        "tool": "mask-impact", "tool_version": __version__, "tool_kind": settings.tool,
        "run_id": None,  # set by the analysis: one per generation (figures count a run once)
        "torch_version": torch.__version__, "transformers_version": _transformers_version(),
        "model": loaded.name, "model_type": config.model_type,
        "family": loaded.adapter.family if loaded.adapter else "text", "dtype": str(loaded.dtype).replace("torch.", ""),
        "gguf": loaded.gguf,  # None, or the GGUF file read (de-quantized to dtype) and its quantisation type
        "device": str(loaded.device), "prompt": settings.prompt, "system": settings.system,
        "prompt_format": inputs.prompt_format,
        "images": [img.to_dict() for img in token_map.images],
        "videos": [clip.to_dict() for clip in inputs.videos],
        "measure": measure.name, "measures": list(settings.measure), "target": settings.target,
        "targets": None,  # set by the analysis: per step, the target, its base probability, the prediction
        "mask_mode": settings.mask_mode,
        "vision_attention": settings.vision_attention if token_map.images else "causal",
        # what the model itself does among an image's tokens (the family's own mask)
        "model_vision_attention": inputs.model_vision_attention,
        **measure.metadata(),
        "layers": layers, "num_layers": len(decoder_layers(loaded.model)),
        "num_heads": config.num_attention_heads, "num_kv_heads": config.num_key_value_heads,
        "hidden_size": config.hidden_size,
        "num_tokens": settings.num_tokens, "steps": steps, "prompt_length": inputs.prompt_length,
        **plan.to_metadata(steps, token_map.text),
        "rows_explained": measure.rows_explained(steps),
        "final_ids": token_map.ids.tolist(), "final_tokens": token_map.text,
        "generated_ids": generated,
        "generated_text": loaded.tokenizer.decode(generated, skip_special_tokens=False),
        "stop_reason": "eos" if generated and generated[-1] in stops else "num_tokens",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def memory_budget_mb(settings: RunSettings, device: torch.device) -> float:
    """The chunk budget: on a GPU larger chunks mean fewer kernel launches per layer."""
    if settings.memory_budget_mb is not None:
        return settings.memory_budget_mb
    return GPU_BUDGET_MB if device.type == "cuda" else CPU_BUDGET_MB


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _transformers_version():
    import transformers

    return transformers.__version__
