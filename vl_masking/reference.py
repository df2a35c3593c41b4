"""The reference methods (the oracles of the tests and of --check): plain, slow, independent.

Layer measure: the model's own decoder layer is called directly on its captured input
(the whole sequence), with the captured position embeddings and a 4D mask whose columns of
the unit are -inf; the variants are read at the last position: Full = layer output - layer
input, Attn = the attention module's output, Head_h = the input of o_proj split per head. One
full-sequence layer pass per unit. Distances in float64, by the textbook formulas.

Attention measure: the layer's attention module is run on its captured input through the family's own
eager attention function (transformers' eager_attention_forward of that model's module), and the unit's
weights, contributions and norms are summed from its softmax weights and values in float64.

Flow measure: full forward passes of the whole model, one without blocking and one per
configuration, with each layer's attention mask replaced (through the attention hook) by the
base mask minus the blocked source -> target edges at the layers of the window; the metrics
from the two sets of logits in float64.

This module shares nothing with the engines (knockout.py, flow.py, capture.py) beyond the
model anatomy (anatomy.py: where the decoder layers are, the attention hook mechanism): it
builds its own masks (with numpy) and computes its own distances and metrics.
"""

import random

import numpy as np
import torch

from .anatomy import AttentionHook, attention_hook, decoder_layers, text_model


def check_draws(sizes: list, k: int) -> list:
    """--check K's sample: K distinct (record, item) pairs, record i holding sizes[i] results, drawn without
    replacement from all of them with a fixed seed (a repeatable check that never recomputes one result twice);
    every result where there are at most K."""
    offsets = np.cumsum([0, *sizes])
    total = int(offsets[-1])
    drawn = random.Random(0).sample(range(total), min(k, total))
    records = np.searchsorted(offsets, drawn, side="right") - 1
    return [(int(r), int(d - offsets[r])) for r, d in zip(records, drawn)]


def base_allowed(length: int, vision_blocks=None, sliding_window=None, device=None) -> torch.Tensor:
    """(S, S) bool, True where query i may attend to key j: j <= i or both in the same image block
    (bidirectional prompt images), and, in a sliding-window layer, j within the window of i."""
    i, j = np.indices((length, length))
    allowed = j <= i
    if vision_blocks is not None:
        block = np.full(length, -1)
        given = np.asarray(vision_blocks.cpu() if hasattr(vision_blocks, "cpu") else vision_blocks)
        block[: len(given)] = given
        allowed = allowed | ((block[i] == block[j]) & (block[i] >= 0))
    if sliding_window:
        allowed = allowed & (i - j < sliding_window)
    return torch.from_numpy(allowed).to(device)


def reference_distance(base: torch.Tensor, masked: torch.Tensor) -> tuple:
    """(l2, cosine distance) of base (D,) and each masked row (n, D), in float64: ||a - b|| and
    1 - a.b / (|a| |b|); with a zero vector, 0 when both are equal and 1 otherwise."""
    a, b = base.double(), masked.double()
    l2 = (b - a).norm(dim=-1)
    norms = a.norm() * b.norm(dim=-1)
    cosine = torch.where(norms > 0, 1 - (b @ a) / norms.clamp_min(1e-300), (l2 > 0).double())
    return l2, cosine


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
    result = {}
    for g, vecs in masked.items():
        stacked = torch.stack(vecs, dim=-2)  # (n, D) or (H, n, d) for the heads
        if stacked.dim() == 2:
            result[g] = reference_distance(base[g], stacked)
        else:
            pairs = [reference_distance(base[g][h], stacked[h]) for h in range(stacked.shape[0])]
            result[g] = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
    return result, base


def reference_error(model, capture, plan, step: int, layer: int, written: dict, unit_indices=None) -> float:
    """Largest error of one (step, layer) of a layer-measure table against the reference method.

    written: {variant: {"l2_distance": (N,), "cosine_distance": (N,)}}, the table's rows of that step and layer
    (measures.layer.written_values). The error of a distance is relative to the size of the vector it measures:
    |l2_ours - l2_ref| / ||base_ref|| and |cos_ours - cos_ref|, maximised over variants and over the units
    `unit_indices` (indices into that step's units; None: all of them). Needs a Capture that kept its layer
    inputs.
    """
    length = plan.prompt_length + step
    units = plan.units(step)
    if unit_indices is None:
        unit_indices = list(range(len(units)))
    hidden, pe = capture.sequence_input(layer, step)
    allowed = base_allowed(length, capture.vision_blocks, capture.sliding_windows.get(layer), hidden.device)
    ref, base = reference_distances(model, layer, hidden, pe, allowed, [units[i].positions for i in unit_indices])
    error = 0.0
    for variant, columns in written.items():
        head = int(variant.removeprefix("Head_")) if variant.startswith("Head_") else None
        ref_l2, ref_cos = (ref[variant] if head is None else (ref["Heads"][0][head], ref["Heads"][1][head]))
        vector = base[variant] if head is None else base["Heads"][head]
        scale = float(torch.linalg.vector_norm(vector.double())) or 1e-30
        ours_l2 = torch.as_tensor(columns["l2_distance"][unit_indices]).double()
        ours_cos = torch.as_tensor(columns["cosine_distance"][unit_indices]).double()
        error = max(error, float((ours_l2 - ref_l2.cpu()).abs().max()) / scale,
                    float((ours_cos - ref_cos.cpu()).abs().max()))
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
def reference_flow(model, forward_kwargs: dict, target: int, blocked: tuple, layers, num_layers: int,
                   vision_blocks=None, sliding_windows=None) -> dict:
    """prob, delta_logprob, KL(base || blocked) and top1 of one configuration: sources -> targets blocked
    (blocked = (source positions, target positions)) at `layers`; one unblocked and one blocked forward pass."""
    sources, targets = blocked
    length = forward_kwargs["input_ids"].shape[1]
    sliding_windows = sliding_windows or {}
    base_masks, masks = {}, {}
    for layer in range(num_layers):
        allowed = base_allowed(length, vision_blocks, sliding_windows.get(layer))
        base_masks[layer] = allowed
        cut = allowed.clone()
        if layer in layers and sources and targets:
            cut[np.ix_(targets, sources)] = False
        masks[layer] = cut
    base = _last_logits(model, forward_kwargs, base_masks)
    logits = _last_logits(model, forward_kwargs, masks)
    log_p0, log_p = torch.log_softmax(base, -1), torch.log_softmax(logits, -1)
    return {"prob": float(log_p[target].exp()), "delta_logprob": float(log_p[target] - log_p0[target]),
            "kl": float((log_p0.exp() * (log_p0 - log_p)).sum()), "top1": int(logits.argmax())}


def _last_logits(model, forward_kwargs: dict, masks: dict) -> torch.Tensor:
    """The next-token logits (float64) at the last position of one full forward pass with these masks."""
    inner = model.model if hasattr(model, "model") else model
    with attention_hook(LayerMasks(masks)):
        out = inner(**forward_kwargs, use_cache=False)
    hidden = out.last_hidden_state[0, -1]
    head = model.get_output_embeddings()
    logits = torch.nn.functional.linear(hidden.double(), head.weight.double(),
                                        None if getattr(head, "bias", None) is None else head.bias.double())
    config = getattr(model.config, "text_config", None) or model.config
    cap = getattr(config, "final_logit_softcapping", None) or getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class EagerWeights(AttentionHook):
    """A layer's attention through the model family's own eager attention function, with the mask
    `allowed` (S, S); records the softmax weights (H, S, S) and the values (KVH, S, d) it used."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.weights = self.values = None

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        import sys

        eager = sys.modules[type(module).__module__].eager_attention_forward
        additive = torch.zeros(self.allowed.shape, dtype=query.dtype, device=query.device)
        additive = additive.masked_fill(~self.allowed.to(query.device), torch.finfo(query.dtype).min)
        out, weights = eager(module, query, key, value, additive[None, None], scaling=scaling, dropout=0.0)
        self.weights, self.values = weights[0], value[0]
        return out  # (1, S, H, d), as the default attention returns it


@torch.no_grad()
def reference_attention(model, layer_index: int, layer_input, position_embeddings, allowed, units) -> tuple:
    """(weights (H, n), head norms (H, n), block norms (n,)) of the last query on each unit (a list of
    positions), in float64, from the family's eager attention of decoder layer `layer_index` run on its
    captured input: alpha from its softmax weights, v from the values it attended with, W_O from o_proj."""
    layer = decoder_layers(model)[layer_index]
    attention = layer.self_attn
    hook = EagerWeights(allowed)
    with attention_hook(hook):
        attention(hidden_states=layer.input_layernorm(layer_input), attention_mask=None,
                  position_embeddings=position_embeddings)
    alpha = hook.weights[:, -1].double()  # (H, S)
    heads, kv_heads = alpha.shape[0], hook.values.shape[0]
    values = hook.values.double().repeat_interleave(heads // kv_heads, dim=0)  # (H, S, d)
    weight = attention.o_proj.weight.double()
    d = values.shape[-1]
    weights, head_norms, block_norms = [], [], []
    for positions in units:
        index = list(positions)
        weights.append(alpha[:, index].sum(dim=1))
        mixed = torch.einsum("hs,hsd->hd", alpha[:, index], values[:, index])  # (H, d)
        parts = torch.stack([weight[:, h * d:(h + 1) * d] @ mixed[h] for h in range(heads)])  # (H, D)
        head_norms.append(parts.norm(dim=-1))
        block_norms.append(parts.sum(dim=0).norm())
    return torch.stack(weights, 1), torch.stack(head_norms, 1), torch.stack(block_norms)


def reference_attention_error(model, capture, plan, step: int, layer: int, written: dict) -> float:
    """Largest error of one (step, layer) of an attention-measure table against reference_attention, every unit.

    written: {variant: {"attention": (N,), "attention_norm": (N,)}}, the table's rows of that step and layer:
    Mean holds the heads' mean weight and mean norm, Block the mean weight and the block's norm, Head_h head h's.
    Weights absolute (they lie in [0, 1]); norms relative to the norm of the layer's whole attention output."""
    hidden, pe = capture.sequence_input(layer, step)
    length = plan.prompt_length + step
    allowed = base_allowed(length, capture.vision_blocks, capture.sliding_windows.get(layer), hidden.device)
    units = [u.positions for u in plan.units(step)]
    weights, head_norms, block_norms = (t.cpu() for t in reference_attention(model, layer, hidden, pe, allowed,
                                                                             units + [tuple(range(length))]))
    scale = float(block_norms[-1]) or 1.0  # every position: the attention output itself (o_proj without bias)
    weights, head_norms, block_norms = weights[:, :-1], head_norms[:, :-1], block_norms[:-1]
    expected = {"Mean": (weights.mean(dim=0), head_norms.mean(dim=0)), "Block": (weights.mean(dim=0), block_norms),
                **{f"Head_{h}": (weights[h], head_norms[h]) for h in range(weights.shape[0])}}
    errors = [0.0]
    for variant, columns in written.items():
        ref_weight, ref_norm = expected[variant]
        errors += [float((torch.as_tensor(columns["attention"]).double() - ref_weight).abs().max()),
                   float((torch.as_tensor(columns["attention_norm"]).double() - ref_norm).abs().max()) / scale]
    return max(errors)


class TowerKeyMask(AttentionHook):
    """The reference's attention for one vision block called on its recorded input: softmax(q k^T * scale + M) v
    in float64, M = -inf at the hidden keys; a query with no key left gets no attention (0). The calls come in
    the order of the block's segments (the tower's anatomy): one segment per call (Qwen's cu_seqlens), or one
    per batch entry of a call (a batch of pictures)."""

    def __init__(self, segments: list, hidden: set):
        self.segments, self.hidden, self.next = segments, hidden, 0

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        batch, length = query.shape[0], key.shape[-2]
        additive = np.zeros((batch, 1, 1, length))
        for b in range(batch):
            start, end = self.segments[self.next]
            self.next += 1
            additive[b, 0, 0, [p - start for p in sorted(self.hidden) if start <= p < end]] = -np.inf
        scores = (query.double() @ key.double().transpose(-1, -2)) * scaling + torch.from_numpy(additive).to(query.device)
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        return (weights @ value.double()).transpose(1, 2).to(query.dtype)  # (B, L, H, d), as sdpa returns it


@torch.no_grad()
def reference_encoder(tower, record, block_index: int, hidden) -> dict:
    """{variant: (l2, cosine distance)} of vision block `block_index` re-run by its own forward on its recorded
    input, with the tower tokens `hidden` masked out of every query's keys, against the same block unmasked:
    Full = output - input, Attn = the attention module's output, Head_h = the input of its projection split
    per head; over all queries of the pictures `hidden` touches (every window of them), and ("... outside")
    those outside it."""
    from .anatomy import ATTENTION_NAME, register_attention

    block = tower.blocks[block_index]
    x, args, kwargs = record.inputs[block_index], record.args[block_index], record.kwargs[block_index]
    segments = tower.anatomy.segments(kwargs, tuple(x.shape))
    hidden = {int(p) for p in hidden}
    register_attention()
    config = tower.module.config
    previous = config._attn_implementation
    attention, projection = block.get_submodule(tower.anatomy.attention), block.get_submodule(tower.anatomy.projection)
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731 - (pictures, S, D) -> (pictures x S, D)

    def run(hide):
        seen = {}
        hooks = [attention.register_forward_hook(
                     lambda m, a, out: seen.__setitem__("Attn", out[0] if isinstance(out, tuple) else out)),
                 projection.register_forward_pre_hook(lambda m, a: seen.__setitem__("Heads", a[0]))]
        config._attn_implementation = ATTENTION_NAME
        try:
            with attention_hook(TowerKeyMask(segments, hide)):
                seen["Full"] = block(x, *args, **kwargs) - x
        finally:
            config._attn_implementation = previous
            for hook in hooks:
                hook.remove()
        heads = flat(seen["Heads"]).reshape(-1, tower.num_heads, seen["Heads"].shape[-1] // tower.num_heads)
        return {"Full": flat(seen["Full"]), "Attn": flat(seen["Attn"]),
                **{f"Head_{h}": heads[:, h] for h in range(tower.num_heads)}}

    base, masked = run(set()), run(hidden)
    touched = [(s, e) for s, e in tower.pictures if any(s <= p < e for p in hidden)]
    queries = np.concatenate([np.arange(s, e) for s, e in touched])
    outside = np.array([q for q in queries if q not in hidden], dtype=np.int64)
    out = {}
    for name in base:
        for suffix, rows in (("", queries), (" outside", outside)):
            a, b = base[name][rows].reshape(-1).double(), masked[name][rows].reshape(-1).double()
            l2, cosine = reference_distance(a, b.unsqueeze(0))
            out[name + suffix] = (float(l2[0]), float(cosine[0]))
    return out


class TowerWindowMask(AttentionHook):
    """The reference's vision attention for one encoder-flow forward: in the window's blocks the hidden tower
    tokens are masked out of every key (TowerKeyMask, float64); every other call is the model's own."""

    def __init__(self, tower, record, window, hidden: set, vision_blocks=None):
        self.block_of = {id(b.get_submodule(tower.anatomy.attention)): i for i, b in enumerate(tower.blocks)}
        self.masks = {b: TowerKeyMask(tower.anatomy.segments(record.kwargs[b], tuple(record.inputs[b].shape)), hidden)
                      for b in window}
        self.vision_blocks = vision_blocks

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        block = self.block_of.get(id(module))
        if block is None and self.vision_blocks is not None and query.shape[2] == key.shape[2]:  # the prompt
            mask = base_allowed(query.shape[2], self.vision_blocks, sliding_window, query.device)
            return run_default(mask[None, None])
        if block not in self.masks:
            return run_default(attention_mask)
        return self.masks[block].attend(module, query, key, value, attention_mask, scaling, sliding_window,
                                        run_default)


@torch.no_grad()
def reference_encoder_flow(model, forward_kwargs: dict, tower, record, series: str, cells, window, positions,
                           pictures: list, target: int, vision_blocks=None) -> dict:
    """prob, delta_logprob, KL(base || changed) and top1 of one encoder-flow configuration, from one unchanged
    and one changed full forward pass of the model (batch of one): series 'knockout' hides the tower tokens
    `cells` in the blocks of `window`; 'mean after projector' / 'zero after projector' replace what the language
    model is given at the image positions `positions` (its input embeddings there and, for Qwen3-VL, the DeepStack
    features of those positions) by their picture's mean or zero; pictures: each picture's image positions."""
    from .anatomy import ATTENTION_NAME, register_attention

    inner = model.model
    register_attention()
    config = tower.module.config
    previous = config._attn_implementation

    def last_logits(window=(), hidden=frozenset()) -> torch.Tensor:
        """One forward, the window's vision blocks hiding `hidden`, the language model's prompt attention as in
        the unblocked run (its image blocks bidirectional when vision_blocks is given)."""
        config._attn_implementation = ATTENTION_NAME
        try:
            with attention_hook(TowerWindowMask(tower, record, window, set(hidden), vision_blocks)):
                out = inner(**forward_kwargs, use_cache=False)
        finally:
            config._attn_implementation = previous
        head = model.get_output_embeddings()
        return torch.nn.functional.linear(out.last_hidden_state[0, -1].double(), head.weight.double(),
                                          None if getattr(head, "bias", None) is None else head.bias.double())

    base = last_logits()
    if series == "knockout":
        logits = last_logits(window, {int(c) for c in cells})
    else:
        def replaced(rows: torch.Tensor, groups: list, wanted: set) -> torch.Tensor:
            """rows (n, D) with the wanted rows of each group (a picture's rows) set to the group's mean or 0."""
            rows = rows.clone()
            for group in groups:
                mine = [r for r in group if r in wanted]
                if mine:
                    rows[mine] = rows[group].double().mean(0).to(rows.dtype) if series.startswith("mean") else 0
            return rows

        per_picture = [list(picture) for picture in pictures]

        def replace(module, args, kwargs):
            kwargs = dict(kwargs)
            kwargs["inputs_embeds"] = replaced(kwargs["inputs_embeds"][0], per_picture, set(positions))[None]
            if kwargs.get("deepstack_visual_embeds") is not None:  # Qwen3-VL: rows in image-position order
                image = torch.nonzero(kwargs["visual_pos_masks"][0]).flatten().tolist()
                row_of = {p: r for r, p in enumerate(image)}
                groups = [[row_of[p] for p in group] for group in per_picture]
                rows = {row_of[p] for p in positions}
                kwargs["deepstack_visual_embeds"] = [replaced(e, groups, rows) for e in kwargs["deepstack_visual_embeds"]]
            return args, kwargs

        handle = text_model(model).register_forward_pre_hook(replace, with_kwargs=True)
        try:
            logits = last_logits()
        finally:
            handle.remove()
    return _metrics(base, logits, target)


def _metrics(base: torch.Tensor, logits: torch.Tensor, target: int) -> dict:
    log_p0, log_p = torch.log_softmax(base, -1), torch.log_softmax(logits, -1)
    return {"prob": float(log_p[target].exp()), "delta_logprob": float(log_p[target] - log_p0[target]),
            "kl": float((log_p0.exp() * (log_p0 - log_p)).sum()), "top1": int(logits.argmax())}


@torch.no_grad()
def reference_deepstack(model, forward_kwargs: dict, level: int, layer: int, positions: list, target: int,
                        vision_blocks=None, sliding_windows=None) -> dict:
    """prob, delta_logprob, KL(base || removed) and top1 of DeepStack level `level` (added after decoder layer
    `layer`) zeroed at `positions` in the language model's call, from one unchanged and one changed full forward
    pass; and ratio: the norm of the level's features at the positions over the norm of layer `layer`'s output
    there (both over all the positions' rows, in float64)."""
    length = forward_kwargs["input_ids"].shape[1]
    layers = decoder_layers(model)
    masks = {i: base_allowed(length, vision_blocks, (sliding_windows or {}).get(i)) for i in range(len(layers))}
    seen = {}

    def zeroed(module, args, kwargs):
        image = torch.nonzero(kwargs["visual_pos_masks"][0]).flatten().tolist()
        rows = [image.index(p) for p in positions]
        embeds = list(kwargs["deepstack_visual_embeds"])
        seen["features"] = embeds[level][rows].double()
        embeds[level] = embeds[level].clone()
        embeds[level][rows] = 0
        return args, {**kwargs, "deepstack_visual_embeds": embeds}

    def residual(module, args, output):
        seen["residual"] = (output[0] if isinstance(output, tuple) else output)[0, positions].double()

    base = _last_logits(model, forward_kwargs, masks)
    handles = [text_model(model).register_forward_pre_hook(zeroed, with_kwargs=True),
               layers[layer].register_forward_hook(residual)]
    try:
        logits = _last_logits(model, forward_kwargs, masks)
    finally:
        for handle in handles:
            handle.remove()
    ratio = float(seen["features"].square().sum().sqrt() / seen["residual"].square().sum().sqrt())
    return {**_metrics(base, logits, target), "ratio": ratio}
