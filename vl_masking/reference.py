"""The reference method (the seed's): re-run the model's own decoder layer with key j hidden.

The layer is called directly on its captured input (the whole sequence), with the
captured position embeddings and a 4D additive mask whose column j is -inf, and the
variants are read at the last position: Full = layer output - layer input, Attn = the
attention module's output, Head_h = the input of o_proj split per head. It is slow
(one full-sequence layer pass per masked token) and plain: the test oracle and the
`--check` certificate.
"""

import torch

from .capture import decoder_layers
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
                       hide: int | None = None) -> dict:
    """Re-run decoder layer `layer_index`; return {'Full': (D,), 'Attn': (D,), 'Heads': (H, d)} at the last position."""
    layer = decoder_layers(model)[layer_index]
    attention = layer.self_attn
    mask = torch.zeros(allowed.shape, dtype=layer_input.dtype, device=layer_input.device)
    mask = mask.masked_fill(~allowed, float("-inf"))
    if hide is not None:
        mask[:, hide] = float("-inf")
    seen = {}
    hooks = [
        attention.register_forward_hook(lambda m, a, out: seen.__setitem__("Attn", out[0][0, -1])),
        attention.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("Heads", a[0][0, -1])),
    ]
    try:
        out = layer(layer_input, attention_mask=mask[None, None], position_embeddings=position_embeddings)
    finally:
        for h in hooks:
            h.remove()
    out = out[0] if isinstance(out, tuple) else out
    heads = attention.config.num_attention_heads
    return {"Full": (out[0, -1] - layer_input[0, -1]).float(), "Attn": seen["Attn"].float(),
            "Heads": seen["Heads"].float().view(heads, -1)}


def reference_distances(model, layer_index, layer_input, position_embeddings, allowed, positions) -> dict:
    """{group: (l2, cos)} for every position in `positions`, by one layer re-run per position."""
    base = reference_variants(model, layer_index, layer_input, position_embeddings, allowed)
    masked = {g: [] for g in base}
    for j in positions:
        for g, vec in reference_variants(model, layer_index, layer_input, position_embeddings, allowed,
                                         int(j)).items():
            masked[g].append(vec)
    result = {}
    for g, vecs in masked.items():
        result[g] = distances(base[g], torch.stack(vecs, dim=-2))  # (..., n, D)
    return result, base


def reference_error(model, capture, prompt_len: int, vision_blocks, record_index: int, position_indices=None):
    """Largest error of one measured (step, layer) record against the reference method.

    The error of a distance is relative to the size of the vector it measures:
    |l2_ours - l2_ref| / ||base_ref|| and |cos_ours - cos_ref|, maximised over variants
    and over the positions `position_indices` (indices into that step's masked
    positions; None: all of them). Needs a Capture that kept its layer inputs.
    """
    step, layer, values = capture.records[record_index]
    length = prompt_len + step
    positions = capture.positions_for(step, length)
    if position_indices is None:
        position_indices = list(range(positions.numel()))
    hidden, pe = capture.sequence_input(layer, step)
    allowed = base_allowed(length, vision_blocks, capture.sliding_windows.get(layer), hidden.device)
    ref, base = reference_distances(model, layer, hidden, pe, allowed, positions[position_indices].tolist())
    error = 0.0
    for group, (l2, cos) in values.items():
        scale = torch.linalg.vector_norm(base[group], dim=-1, keepdim=True).clamp_min(1e-30)
        ours_l2, ours_cos = l2[..., position_indices], cos[..., position_indices]
        error = max(error, float(((ours_l2 - ref[group][0]).abs() / scale).max()),
                    float((ours_cos - ref[group][1]).abs().max()))
    return error
