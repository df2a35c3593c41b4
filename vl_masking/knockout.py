"""The layer measure's engine: batched re-attention of the last query, every mask unit of one layer at once.

Inside one layer, hiding a set of keys U_n changes only the attention distributions; K
and V do not change, and only the last query row is measured. So for the last query q
(all heads) and the layer's K, V:

    logits[h, i]           = scale * q[h] . K[h, i]
    masked_logits[h, n, i] = logits[h, i], with every i in U_n set to -inf
    O[h, n]                = softmax(masked_logits[h, n]) @ V[h]

O gives every Head_h variant for all units at once, o_proj(O) gives Attn, and the rest
of the decoder layer applied to the N rows gives Full. The units come from the run's
MaskPlan as an N x S boolean hide mask. This is the -inf masking itself, restricted to
the measured row: there is no subtraction shortcut, which would cancel catastrophically
when p_j -> 1. Softmax and distances run in float32 whatever the model dtype.
"""

from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError


def usable_memory(memory_budget_bytes: int, device) -> int:
    """Bytes a chunked computation may use: the budget, and on a GPU at most half of what is free now."""
    if device.type == "cuda":
        return min(memory_budget_bytes, torch.cuda.mem_get_info(device)[0] // 2)
    return memory_budget_bytes


@dataclass
class LastQuery:
    """What the attention function saw for one layer, reduced to the measured row."""

    q: torch.Tensor  # (H, d) float32, post-norm and post-RoPE
    k: torch.Tensor  # (KVH, S_k, d) float32, after the cache update
    v: torch.Tensor  # (KVH, S_k, d) float32
    allowed: torch.Tensor | None  # (S_k,) bool: the model's own mask row for the last query; None = all
    scaling: float
    key_offset: int  # absolute position of key 0 (non-zero when a sliding-window cache dropped old keys)
    length: int  # sequence length; K holds every position when key_offset == 0 and S_k == length


def last_query_logits(lq: LastQuery) -> torch.Tensor:
    """(H, S_k) attention logits of the last query, with the model's own mask applied."""
    heads, d = lq.q.shape
    kv_heads = lq.k.shape[0]
    logits = torch.matmul(lq.q.view(kv_heads, heads // kv_heads, d), lq.k.transpose(1, 2))
    logits = logits.reshape(heads, -1) * lq.scaling
    if lq.allowed is not None:
        logits = torch.where(lq.allowed, logits, float("-inf"))
    return logits


def mix_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (H, n, S_k) @ V per key-value group (grouped-query attention without repeat) -> (H, n, d)."""
    heads, n, s = probs.shape
    kv_heads, _, d = v.shape
    return torch.matmul(probs.reshape(kv_heads, (heads // kv_heads) * n, s), v).view(heads, n, d)


def head_outputs(lq: LastQuery, logits: torch.Tensor, hide: torch.Tensor) -> torch.Tensor:
    """(H, n, d): the last query's per-head output with the keys of row n of `hide` (n, S_k) hidden."""
    # masked_fill with the boolean rows: no boolean indexing, which would wait for the GPU.
    probs = torch.softmax(logits.unsqueeze(1).masked_fill(hide, float("-inf")), dim=-1)
    # A row whose every key is hidden has no defined softmax; it contributes nothing.
    probs = torch.nan_to_num(probs, nan=0.0)
    return mix_values(probs, lq.v)


def distances(base: torch.Tensor, masked: torch.Tensor):
    """L2 and cosine distance between base (..., D) and each of masked (..., n, D), in float32.

    Cosine distance is 1 - cos, computed as ||a/|a| - b/|b|||^2 / 2, which equals it exactly
    and keeps small distances accurate. When a vector is zero the cosine is undefined; we
    define the distance as 0 when both vectors are equal (both zero) and 1 otherwise.
    """
    base = base.float().unsqueeze(-2)
    masked = masked.float()
    l2 = torch.linalg.vector_norm(masked - base, dim=-1)
    base_norm = torch.linalg.vector_norm(base, dim=-1)
    masked_norm = torch.linalg.vector_norm(masked, dim=-1)
    unit_diff = masked / masked_norm.clamp_min(1e-30).unsqueeze(-1) - base / base_norm.clamp_min(1e-30).unsqueeze(-1)
    cosine = 0.5 * torch.linalg.vector_norm(unit_diff, dim=-1).square()
    degenerate = torch.minimum(base_norm, masked_norm) == 0
    cosine = torch.where(degenerate, torch.sign(l2), cosine)  # sign: 0 for equal vectors, else 1
    return l2, cosine


class LayerTail:
    """The part of a decoder layer after attention, applied to many attention outputs at once.

    Two residual layouts cover the supported families:
      pre-norm (Llama, Mistral, Qwen2/3, Qwen3-VL): h = x + attn; out = h + mlp(post_attention_layernorm(h))
      sandwich (Gemma 3): h = x + post_attention_layernorm(attn);
                          out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
    The MLP is the layer's own module, so mixture-of-experts routing is reproduced.
    """

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        names = {name for name, _ in layer.named_children()}
        if {"pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_layernorm"} <= names:
            self.layout = "sandwich"
        elif {"post_attention_layernorm", "mlp"} <= names:
            self.layout = "pre-norm"
        else:
            raise UnsupportedModelError(
                f"decoder layer {type(layer).__name__} has an unknown residual layout (children: {sorted(names)})")

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer.mlp(x.unsqueeze(0))
        if isinstance(out, tuple):  # MoE blocks also return router logits
            out = out[0]
        return out.reshape(x.shape)

    def update(self, x_last: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual update out - x for one layer input x_last (D,) and attention outputs attn (n, D)."""
        layer = self.layer
        if self.layout == "sandwich":
            h = x_last + layer.post_attention_layernorm(attn)
            out = h + layer.post_feedforward_layernorm(self._mlp(layer.pre_feedforward_layernorm(h)))
        else:
            h = x_last + attn
            out = h + self._mlp(layer.post_attention_layernorm(h))
        return out - x_last


def measure_layer(lq: LastQuery, hide: torch.Tensor, x_last: torch.Tensor, attention: torch.nn.Module,
                  tail: LayerTail | None, variants, memory_budget_bytes: int):
    """Distances for every unit of one layer.

    hide: (N, length) bool, row n True at the positions unit n hides. Returns
    ({group: (l2, cosine)}, {group: base norm}) with 'Full' and 'Attn' distances of shape
    (N,) and 'Heads' of shape (H, N); base norms () and (H,).
    """
    model_dtype = attention.o_proj.weight.dtype
    logits = last_query_logits(lq)
    heads, s = logits.shape
    # Under a device map the layer runs where its weights are; the hooks saw its input before
    # accelerate moved it there.
    x_last = x_last.to(logits.device)
    # K holds positions key_offset .. length-1 (a sliding-window cache drops older keys, which
    # the query cannot see anyway): hide those columns.
    hide = hide.to(logits.device)[:, lq.key_offset: lq.key_offset + s]

    # Per chunk: the H x n x S logits block, its softmax, and the MLP rows dominate memory.
    hidden_rows = 4 * (x_last.numel() * 4 + getattr(attention.config, "intermediate_size", 0) * 3)
    per_unit = 4 * heads * s * 3 + hidden_rows
    chunk = max(1, int(usable_memory(memory_budget_bytes, logits.device) // per_unit))
    parts = {g: ([], []) for g in variants}
    base = {}
    nothing = hide.new_zeros((1, s))
    start = 0
    while start < hide.shape[0]:
        # Row 0 of every chunk is the unmasked baseline, computed by the same kernels as the
        # masked rows, so hiding keys the query cannot see anyway gives exactly zero.
        rows_hidden = torch.cat([nothing, hide[start:start + chunk]])
        try:
            rows = _variant_rows(lq, logits, rows_hidden, x_last, attention, tail, variants, model_dtype)
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)  # less memory than estimated: halve the chunk and go on
            continue
        if "Heads" in variants:
            heads_rows = rows["Heads"]  # (H, n+1, d)
            base.setdefault("Heads", heads_rows[:, 0])
            _append(parts["Heads"], distances(heads_rows[:, 0], heads_rows[:, 1:]))
        whole = [g for g in ("Full", "Attn") if g in variants]
        if whole:
            # Full and Attn have the same width: one distance computation for both.
            stacked = torch.stack([rows[g] for g in whole])  # (G, n+1, D)
            l2, cos = distances(stacked[:, 0], stacked[:, 1:])
            for i, g in enumerate(whole):
                base.setdefault(g, stacked[i, 0])
                _append(parts[g], (l2[i], cos[i]))
        start += chunk
    norms = {g: torch.linalg.vector_norm(b.float(), dim=-1) for g, b in base.items()}
    return {g: (torch.cat(l2, dim=-1), torch.cat(cos, dim=-1)) for g, (l2, cos) in parts.items()}, norms


def _variant_rows(lq, logits, hide, x_last, attention, tail, variants, model_dtype) -> dict:
    """Head outputs, Attn and Full rows for the hide rows of one chunk."""
    o = head_outputs(lq, logits, hide)
    rows = {"Heads": o}
    if "Attn" in variants or "Full" in variants:
        # (H, n, d) -> (n, hidden) through the module's own o_proj
        rows["Attn"] = attention.o_proj(o.transpose(0, 1).reshape(o.shape[1], -1).to(model_dtype)).float()
        if "Full" in variants:
            rows["Full"] = tail.update(x_last, rows["Attn"].to(model_dtype)).float()
    return rows


def _append(part, values):
    part[0].append(values[0])
    part[1].append(values[1])


def attention_layer(model, index: int):
    from .anatomy import decoder_layers

    return decoder_layers(model)[index]
