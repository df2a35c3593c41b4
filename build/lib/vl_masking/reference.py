"""The reference methods (the oracles of the tests and of --check): plain, slow, independent.

Layer measure: the model's own decoder layer is called directly on its captured input
(the whole sequence), with the captured position embeddings and a 4D additive mask whose
columns of the unit are -inf; the variants are read at the last position: Full = layer
output - layer input, Attn = the attention module's output, Head_h = the input of o_proj
split per head. One full-sequence layer pass per unit.

Flow measure: one full forward pass of the whole model per configuration, with each
layer's attention mask replaced (through the attention hook) by the base mask minus the
blocked source -> target edges at the layers of the window.
"""

import torch

from .capture import AttentionHook, attention_hook, decoder_layers
from .knockout import distances


def base_allowed(length: int, vision_blocks=None, sliding_window=None, device=None) -> torch.Tensor:
    """(S, S) bool: causal, plus bidirectional within each image block, minus keys beyond a sliding window."""
    pos = torch.arange(length, device=device)
    allowed = pos[None, :] <= pos[:, None]
    if sliding_window:
        allowed &= pos[:, None] - pos[None, :] < sliding_window
    if vision_blocks is not None:
        blocks = torch.full((length,), -1, dtype=torch.long, device=device)
        blocks[: vision_blocks.numel()] = vision_blocks.to(device)
        allowed |= (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)
    return allowed


@torch.no_grad()
def reference_variants(model, layer_index: int, layer_input: torch.Tensor, position_embeddings, allowed,
                       hide=None) -> dict:
    """Re-run decoder layer `layer_index` with the positions `hide` hidden from every query;
    return {'Full': (D,), 'Attn': (D,), 'Heads': (H, d)} at the last position."""
    layer = decoder_layers(model)[layer_index]
    attention = layer.self_attn
    mask = allowed.clone()
    if hide is not None and len(hide):
        mask[:, list(hide)] = False  # the -inf columns
    seen = {}
    hooks = [
        attention.register_forward_hook(lambda m, a, out: seen.__setitem__("Attn", out[0][0, -1])),
        attention.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("Heads", a[0][0, -1])),
    ]
    try:
        with attention_hook(LayerMasks({layer_index: mask})):
            out = layer(layer_input, attention_mask=None, position_embeddings=position_embeddings)
    finally:
        for h in hooks:
            h.remove()
    out = out[0] if isinstance(out, tuple) else out
    heads = attention.config.num_attention_heads
    return {"Full": (out[0, -1] - layer_input[0, -1]).float(), "Attn": seen["Attn"].float(),
            "Heads": seen["Heads"].float().view(heads, -1)}


def reference_distances(model, layer_index, layer_input, position_embeddings, allowed, units) -> tuple:
    """{group: (l2, cos)} for every unit (a list of positions), by one layer re-run per unit."""
    base = reference_variants(model, layer_index, layer_input, position_embeddings, allowed)
    masked = {g: [] for g in base}
    for positions in units:
        for g, vec in reference_variants(model, layer_index, layer_input, position_embeddings, allowed,
                                         positions).items():
            masked[g].append(vec)
    result = {g: distances(base[g], torch.stack(vecs, dim=-2)) for g, vecs in masked.items()}
    return result, base


def reference_error(model, capture, plan, record, unit_indices=None) -> float:
    """Largest error of one measured (step, layer) record against the reference method.

    The error of a distance is relative to the size of the vector it measures:
    |l2_ours - l2_ref| / ||base_ref|| and |cos_ours - cos_ref|, maximised over variants
    and over the units `unit_indices` (indices into that step's units; None: all of
    them). Needs a Capture that kept its layer inputs.
    """
    step, layer, values = record[:3]
    length = plan.prompt_length + step
    units = plan.units(step)
    if unit_indices is None:
        unit_indices = list(range(len(units)))
    hidden, pe = capture.sequence_input(layer, step)
    allowed = base_allowed(length, capture.vision_blocks, capture.sliding_windows.get(layer), hidden.device)
    ref, base = reference_distances(model, layer, hidden, pe, allowed, [units[i].positions for i in unit_indices])
    error = 0.0
    for group, (l2, cos) in values.items():
        scale = torch.linalg.vector_norm(base[group], dim=-1, keepdim=True).clamp_min(1e-30)
        ours_l2, ours_cos = l2[..., unit_indices], cos[..., unit_indices]
        error = max(error, float(((ours_l2 - ref[group][0]).abs() / scale).max()),
                    float((ours_cos - ref[group][1]).abs().max()))
    return error


class LayerMasks(AttentionHook):
    """A full forward pass with each layer's mask replaced: masks[layer] is an (S, S) bool, True = may attend.

    A query row with nothing left to attend to contributes a zero attention output (the
    engine's definition), where softmax over no keys would give NaN.
    """

    def __init__(self, masks: dict):
        self.masks = masks

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        mask = self.masks[module.layer_idx].to(query.device)
        out = run_default(mask[None, None])
        empty = ~mask.any(dim=-1)  # (S,)
        if bool(empty.any()):
            out = out.masked_fill(empty[None, :, None, None], 0.0)
        return out


@torch.no_grad()
def reference_final_hidden(model, forward_kwargs: dict, masks: dict) -> torch.Tensor:
    """The final hidden state (after the final norm) at the last position of one full forward pass."""
    inner = model.model if hasattr(model, "model") else model
    with attention_hook(LayerMasks(masks)):
        out = inner(**forward_kwargs, use_cache=False)
    return out.last_hidden_state[0, -1]
