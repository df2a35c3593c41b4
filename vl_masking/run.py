"""One run: prompt -> greedy generation with every step measured -> result table and metadata.

Step s analyses the prompt plus the first s generated tokens: the forward pass that
predicts generated token s. Generation is transformers' own greedy `generate` (so the
tokens are the model's), with the text decoder's attention routed through the
mask_impact function, which measures each forward pass as it happens. With
`--vision-attention bidirectional` the prompt prefill lets each image's tokens see
each other; later steps decode causally over that cache.
"""

import random
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from .capture import Capture, decoder_layers, select_attention
from .inputs import IMAGE_PAD, LoadedModel, PromptInputs, stop_token_ids
from .options import RunSettings, parse_layers
from .reference import reference_error
from .tokens import build_token_map, maskable_positions

COLUMNS = ["generation_step", "layer", "token_position", "token_masked", "token_type", "image_index",
           "grid_row", "grid_col", "variant", "l2_distance", "cosine_distance"]


@dataclass
class Analysis:
    table: pd.DataFrame
    metadata: dict
    capture: Capture  # kept for tests and the reference check


def text_config(model):
    return getattr(model.config, "text_config", None) or model.config


def analyse(loaded: LoadedModel, inputs: PromptInputs, settings: RunSettings, progress: bool = True,
            keep_layer_inputs: bool = False) -> Analysis:
    model, tok = loaded.model, loaded.tokenizer
    select_attention(model)
    config = text_config(model)
    num_layers = len(decoder_layers(model))
    layers = parse_layers(settings.layers, num_layers)
    prompt_ids = inputs.input_ids[0].cpu()
    prompt_len = prompt_ids.numel()
    pad_id = tok.convert_tokens_to_ids(IMAGE_PAD) if loaded.is_vision_language else None
    prompt_map = build_token_map(tok, prompt_ids.numpy(), pad_id, inputs.image_grid_thw, inputs.merge_size,
                                 inputs.image_sizes, settings.images)
    positions_for = _position_plan(prompt_map.is_vision, settings.mask_mode, loaded.device)
    blocks = None
    if settings.vision_attention == "bidirectional" and prompt_map.images:
        blocks = torch.from_numpy(prompt_map.image_index.astype(np.int64))

    bar = tqdm(total=settings.num_tokens, desc="steps", unit="step", disable=not progress)
    capture = Capture(model, layers, settings.variants, positions_for, vision_blocks=blocks,
                      memory_budget_bytes=int(memory_budget_mb(settings, loaded.device) * (1 << 20)),
                      keep_layer_inputs=keep_layer_inputs or settings.check > 0,
                      on_step_done=lambda step: bar.update(1))
    stops = stop_token_ids(tok)
    started = time.perf_counter()
    with torch.no_grad(), capture:
        output = model.generate(**inputs.model_kwargs, max_new_tokens=settings.num_tokens, do_sample=False,
                                num_beams=1, temperature=None, top_p=None, top_k=None, eos_token_id=stops,
                                pad_token_id=stops[0] if stops else None)
    _synchronize(loaded.device)
    analysis_s = time.perf_counter() - started
    bar.close()

    final_ids = output[0].cpu()
    generated = final_ids[prompt_len:].tolist()
    stop_reason = "eos" if generated and generated[-1] in stops else "num_tokens"
    token_map = build_token_map(tok, final_ids.numpy(), pad_id, inputs.image_grid_thw, inputs.merge_size,
                                inputs.image_sizes, settings.images)
    table = build_table(capture.records, token_map, positions_for, config.num_attention_heads, prompt_len)
    steps = capture.step + 1
    masked_counts = [int(positions_for(s, prompt_len + s).numel()) for s in range(steps)]
    metadata = {
        "tool": "mask-impact", "tool_version": __version__, "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "model": loaded.name, "model_type": config.model_type, "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device), "prompt": settings.prompt,
        "prompt_format": "qwen3-vl chat" if loaded.is_vision_language else ("chat template" if settings.chat else "raw"),
        "images": [img.to_dict() for img in token_map.images],
        "mask_mode": settings.mask_mode,
        "vision_attention": settings.vision_attention if token_map.images else "causal",
        "variants": list(settings.variants), "layers": layers, "num_layers": num_layers,
        "num_heads": config.num_attention_heads, "num_kv_heads": config.num_key_value_heads,
        "hidden_size": config.hidden_size,
        "num_tokens": settings.num_tokens, "steps": steps, "prompt_length": prompt_len,
        "masked_positions_per_step": masked_counts,
        "skipped_positions_per_step": [prompt_len + s - c for s, c in enumerate(masked_counts)],
        "final_ids": final_ids.tolist(), "final_tokens": token_map.text,
        "generated_ids": generated, "generated_text": tok.decode(generated, skip_special_tokens=False),
        "stop_reason": stop_reason,
        "timings": {"analysis_s": round(analysis_s, 4)},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    analysis = Analysis(table=table, metadata=metadata, capture=capture)
    if settings.check:
        metadata["check"] = run_check(loaded, analysis, settings.check, blocks)
    return analysis


def memory_budget_mb(settings: RunSettings, device: torch.device) -> float:
    """The chunk budget: on a GPU larger chunks mean fewer kernel launches per layer."""
    if settings.memory_budget_mb is not None:
        return settings.memory_budget_mb
    return 768 if device.type == "cuda" else 256


def _position_plan(prompt_is_vision: np.ndarray, mask_mode: str, device):
    """positions_for(step, length): the key positions hidden at a step, as a tensor on the device."""
    cache = {}

    def positions_for(step: int, length: int) -> torch.Tensor:
        if length not in cache:
            positions = maskable_positions(prompt_is_vision, mask_mode, length).astype(np.int64)
            cache[length] = torch.from_numpy(positions).to(device)
        return cache[length]

    return positions_for


def variant_names(groups, num_heads: int) -> list:
    names = []
    for g in groups:
        names.extend([f"Head_{h}" for h in range(num_heads)] if g == "Heads" else [g])
    return names


def build_table(records, token_map, positions_for, num_heads: int, prompt_len: int) -> pd.DataFrame:
    """One row per (generation_step, layer, token_position, variant), built without per-row Python."""
    chunks = []
    for step, layer, values in records:
        groups = list(values)
        names = variant_names(groups, num_heads)
        l2 = torch.cat([values[g][0].reshape(-1, values[g][0].shape[-1]) for g in groups]).cpu().numpy()
        cos = torch.cat([values[g][1].reshape(-1, values[g][1].shape[-1]) for g in groups]).cpu().numpy()
        positions = positions_for(step, prompt_len + step).cpu().numpy()
        n, v = len(positions), len(names)
        chunks.append({
            "generation_step": np.full(n * v, step, dtype=np.int32),
            "layer": np.full(n * v, layer, dtype=np.int32),
            "token_position": np.repeat(positions.astype(np.int32), v),
            "variant": np.tile(np.arange(v, dtype=np.int32), n),
            "variant_names": names,
            "l2_distance": l2.T.reshape(-1).astype(np.float32),
            "cosine_distance": cos.T.reshape(-1).astype(np.float32),
        })
    return _assemble(chunks, token_map)


def _assemble(chunks, token_map) -> pd.DataFrame:
    if not chunks:
        return pd.DataFrame({c: [] for c in COLUMNS})
    all_names = []
    for c in chunks:
        for name in c["variant_names"]:
            if name not in all_names:
                all_names.append(name)
    codes = []
    for c in chunks:
        remap = np.array([all_names.index(n) for n in c["variant_names"]], dtype=np.int32)
        codes.append(remap[c["variant"]])
    pos = np.concatenate([c["token_position"] for c in chunks])
    texts = np.array(token_map.text, dtype=object)
    token_text = pd.Categorical(texts[pos])
    return pd.DataFrame({
        "generation_step": np.concatenate([c["generation_step"] for c in chunks]),
        "layer": np.concatenate([c["layer"] for c in chunks]),
        "token_position": pos,
        "token_masked": token_text,
        "token_type": pd.Categorical.from_codes(token_map.is_vision[pos].astype(np.int8), ["text", "vision"]),
        "image_index": token_map.image_index[pos],
        "grid_row": token_map.grid_row[pos],
        "grid_col": token_map.grid_col[pos],
        "variant": pd.Categorical.from_codes(np.concatenate(codes), all_names),
        "l2_distance": np.concatenate([c["l2_distance"] for c in chunks]),
        "cosine_distance": np.concatenate([c["cosine_distance"] for c in chunks]),
    })


def run_check(loaded: LoadedModel, analysis: Analysis, k: int, vision_blocks) -> dict:
    """Recompute k random (step, layer, position) triples with the reference method."""
    capture = analysis.capture
    rng = random.Random(0)
    started = time.perf_counter()
    triples = []
    for _ in range(k):
        index = rng.randrange(len(capture.records))
        step, layer, _ = capture.records[index]
        positions = capture.positions_for(step, analysis.metadata["prompt_length"] + step)
        n = rng.randrange(positions.numel())
        error = reference_error(loaded.model, capture, analysis.metadata["prompt_length"], vision_blocks, index, [n])
        triples.append({"step": step, "layer": layer, "position": int(positions[n]), "max_error": error})
    return {"triples": triples, "max_relative_error": max(t["max_error"] for t in triples),
            "seconds": round(time.perf_counter() - started, 3)}


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _transformers_version():
    import transformers

    return transformers.__version__
