"""The attention measure: what the last query attends to, per unit, from the unblocked pass.

For each generation step, measured layer and head h, with alpha[h, j] the last query's softmax weight on
key j (the model's own mask applied: causal, bidirectional images, sliding windows) and U a unit:

    attention[h, U]       = sum_{j in U} alpha[h, j]
    attention_norm[h, U]  = || W_O,h  sum_{j in U} alpha[h, j] v_j ||     (Kobayashi et al., EMNLP 2020)

W_O,h is head h's slice of o_proj (its bias belongs to no token and is left out). Variants (the option
attention_variants): Head_h per head; Mean, the mean over heads of both; and Block, the whole attention
block: its attention is the mean weight too, its attention_norm the norm of the unit's contribution to the
block's output, || sum_h W_O,h u_h || (not a mean of the heads' norms: their vectors add).

The engine already has, per layer and step, the last query and the layer's keys and values (the Capture of
the unblocked generation): one softmax row per head, no S x S matrix, no eager attention. A head's norm needs
no D-wide product: ||W_O,h u||^2 = u^T G_h u with G_h = W_O,h^T W_O,h, d x d (made once per loaded model and
layer), and a token unit's is alpha[h, j] ||W_O,h v_j||, with ||W_O,h v_j|| computed once per position. Block needs what the heads' vectors share: per position j the H x H Gram matrix M_j = P_j P_j^T
of P[h, j] = W_O,h v_j, an o_proj-sized product once per position and layer (values never change once a
position exists); each step then costs alpha^T M_j alpha per token unit. A unit of several positions mixes
its values under the step's weights, its block norm through o_proj's weight.
The one-position units of all steps of a layer are read out together after the generation.
The reference (reference.reference_attention, and in the tests the model's own output_attentions) computes
the same from the model's eager attention.
"""

from dataclasses import dataclass

from ..fields import option
from .base import Measure, Metric, register
from .tables import per_step_rows, variant_names, variant_table, written_values

ATTENTION_VARIANT_GROUPS = ("Mean", "Block", "Heads")
ATTENTION_COLUMNS = ["generation_step", "layer", "token_position", "token_masked", "token_type", "image_index",
                     "grid_row", "grid_col", "variant", "attention", "attention_norm", "unit", "unit_kind",
                     "unit_size", "unit_positions", "grid_rows", "grid_cols"]


def head_grams(weight, heads: int):
    """(H, d, d): W_O,h^T W_O,h for each head's slice W_O,h (D, d) of o_proj's weight (D, H*d), so that
    ||W_O,h u||^2 = u^T G_h u: a d x d product per vector instead of D x d."""
    import torch

    d_model, width = weight.shape
    slices = weight.reshape(d_model, heads, width // heads).permute(1, 0, 2)  # (H, D, d)
    return torch.bmm(slices.transpose(1, 2), slices)


def head_norms_of(u, grams):
    """(H, n): ||W_O,h u_(h, n)|| for u (H, n, d), from the heads' Gram matrices (H, d, d)."""
    import torch

    return (torch.bmm(u, grams) * u).sum(dim=-1).clamp_min(0).sqrt()


def head_scales(v, grams):
    """(n, H): ||W_O,h v_(kv(h), j)|| for each position j of v (KVH, n, d), from the heads' Gram matrices."""
    return head_norms_of(v.repeat_interleave(grams.shape[0] // v.shape[0], dim=0), grams).T  # (H, n) -> (n, H)


def position_grams(v, weight, heads: int, memory_budget_bytes: int):
    """(S, H, H): for each position j, the Gram matrix of its heads' output vectors P[h] = W_O,h v_(kv(h), j).

    With these, a one-position unit's block norm needs no D-wide product per step: sqrt(alpha^T M alpha).
    v: (KVH, S, d); weight: (D, H*d).
    """
    import torch

    from ..knockout import usable_memory

    kv_heads, length, d = v.shape
    slices = weight.reshape(weight.shape[0], heads, d).permute(1, 2, 0)  # (H, d, D): W_O,h transposed
    per_position = 4 * heads * weight.shape[0] * 2
    chunk = max(1, int(usable_memory(memory_budget_bytes, v.device) // per_position))
    grams = []
    for start in range(0, length, chunk):
        part = v[:, start: start + chunk].repeat_interleave(heads // kv_heads, dim=0)  # (H, n, d)
        outputs = torch.bmm(part, slices).transpose(0, 1)  # (n, H, D)
        grams.append(torch.bmm(outputs, outputs.transpose(1, 2)))  # (n, H, H)
    return torch.cat(grams)


def unit_attention(lq, probs, hide, weight, grams, block: bool, memory_budget_bytes: int):
    """Attention weight and contribution norms of units, each unit's values mixed on its own.

    lq: the knockout.LastQuery of the layer; probs: its softmax row (H, S_k); hide: (N, length) bool, row n the
    positions of unit n; weight: o_proj's weight (D, H*d) float32; grams: head_grams (H, d, d).
    Returns weights (H, N), head norms (H, N) and block norms (N,) (None unless block), float32.
    """
    import torch

    from ..knockout import mix_values, usable_memory

    heads, s = probs.shape
    member = hide.to(probs.device)[:, lq.key_offset: lq.key_offset + s].float()  # (N, S_k)
    weights = probs @ member.T  # (H, N)
    chunk = max(1, int(usable_memory(memory_budget_bytes, probs.device) // (4 * heads * s * 2)))
    head_norms, block_norms = [], []
    for start in range(0, member.shape[0], chunk):
        rows = member[start: start + chunk]  # (n, S_k)
        u = mix_values(probs.unsqueeze(1) * rows.unsqueeze(0), lq.v)  # (H, n, d): sum_j alpha_hj v_j over U
        head_norms.append(head_norms_of(u, grams))
        if block:
            whole = u.transpose(0, 1).reshape(u.shape[1], -1) @ weight.T  # (n, D): sum_h W_O,h u_h
            block_norms.append(torch.linalg.vector_norm(whole, dim=-1))
    return weights, torch.cat(head_norms, dim=1), torch.cat(block_norms) if block else None


@register
class AttentionMeasure(Measure):
    """The unblocked attention of the last query on each unit: its weight and its contribution's norm."""

    name = "attention"
    help = "the last query's attention weight on each unit and the norm of the unit's contribution"
    question = "what does each layer's last position attend to?"
    columns = ATTENTION_COLUMNS
    series_column, series_label = "variant", "head"
    normalise = "step"  # weights sum to one in every layer and head: one scale across the layers
    metrics = (Metric("attention", "attention weight", "attention"),  # summed over the unit's keys
               Metric("attention_norm", "attention contribution norm", "attention_norm"))

    @dataclass
    class Options:
        attention_variants: tuple = option(
            ("Mean", "Heads"), "with --measure attention: any of Mean (the mean over heads), Block (the whole "
            "attention block's contribution norm: one o_proj-sized product more per position and layer) and Heads",
            kind="csv", choices=ATTENTION_VARIANT_GROUPS)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []  # filled by finish: (step, layer, weights (H, N), head norms (H, N), block norms (N,))
        self.softmaxes = []  # per (step, layer): (step, layer, key offset, the last query's softmax (H, S_k), layout)
        self.mixed = {}  # (step, layer) -> (weights, head norms, block norms) of the units of several positions
        self.head_grams = {}  # layer -> head_grams (H, d, d)
        self.o_proj = {}  # layer -> o_proj's weight (the parameter itself)
        self.scales = {}  # layer -> [(n, H) ||W_O,h v_j|| of the positions known so far]
        self.grams = {}  # layer -> [(n, H, H) Gram matrices of the positions known so far], with Block
        self.later = {}  # layer -> [(KVH, n, d) values of generated positions, read out in finish]
        self.known = {}  # layer -> positions whose scales are computed or whose values are kept
        self.layouts = {}  # (step, key offset, keys) -> _layout's (single, positions, other units' rows)
        self.heads = self.loaded.text_config.num_attention_heads
        self.groups = [g for g in ATTENTION_VARIANT_GROUPS if g in self.settings.attention_variants]
        self.block = "Block" in self.groups

    def capture_options(self) -> dict:
        return {"on_layer": True, "keep_layer_inputs": self.settings.check > 0}

    def on_layer(self, step: int, layer: int, pending: dict, length: int) -> None:
        """While the layer's keys and values exist: the softmax row, what the new positions' values give, and the
        units of several positions. The one-position units wait for finish, all steps of a layer at once."""
        import torch

        from ..knockout import last_query_logits

        lq = pending["last_query"]
        probs = torch.softmax(last_query_logits(lq), dim=-1)  # (H, S_k)
        hide = self.plan.hide_mask(step, lq.q.device)
        layout = self._layout(step, hide, lq.key_offset, lq.k.shape[1])
        self.softmaxes.append((step, layer, lq.key_offset, probs, layout))
        if layer not in self.head_grams:
            self.o_proj[layer] = pending["attention"].o_proj.weight
            self.head_grams[layer] = self._head_grams(layer, lq.q.device)
        have, end = self.known.get(layer, 0), lq.key_offset + lq.v.shape[1]
        if have < end:
            new = lq.v[:, have - lq.key_offset:]  # (KVH, n, d)
            if step == 0:  # the prompt: read out now (keeping its values would copy the cache)
                self._read_positions(layer, new)
            else:  # a generated token: a few values, kept for one product per layer in finish
                self.later.setdefault(layer, []).append(new.clone())
            self.known[layer] = end
        if layout[2] is not None:
            self.mixed[(step, layer)] = unit_attention(lq, probs, hide[layout[2]], self._weight(layer, lq.q.device),
                                                       self.head_grams[layer], self.block, self.memory_budget_bytes)

    def _read_positions(self, layer: int, values) -> None:
        """What positions' values (KVH, n, d) give every later step: their heads' norms ||W_O,h v_j|| (n, H) and,
        with Block, their Gram matrices (n, H, H), whose diagonal holds the same norms squared."""
        import torch

        if self.block:
            grams = position_grams(values, self._weight(layer, values.device), self.heads, self.memory_budget_bytes)
            self.grams.setdefault(layer, []).append(grams)
            scales = torch.diagonal(grams, dim1=1, dim2=2).clamp_min(0).sqrt()
        else:
            scales = head_scales(values, self.head_grams[layer])
        self.scales.setdefault(layer, []).append(scales)

    def _head_grams(self, layer: int, device):
        """The layer's head_grams, made once per loaded model (and again if its o_proj weight changed)."""
        weight = self.o_proj[layer]
        key = (weight.data_ptr(), weight._version, str(device))
        known = self.loaded.head_grams.get(layer)
        if known is None or known[0] != key:
            known = self.loaded.head_grams[layer] = (key, head_grams(self._weight(layer, device), self.heads))
        return known[1]

    def _weight(self, layer: int, device):
        """o_proj's weight (D, H*d) of a layer, float32 on `device` (a copy only for another dtype or device)."""
        return self.o_proj[layer].to(device).float()

    def _layout(self, step: int, hide, key_offset: int, keys: int) -> tuple:
        """Which units are one position among the keys, and which position (the same in every layer of a step,
        unless a sliding window drops keys): single (N,) bool and their positions from 0 (numpy), and the other
        units' rows (a bool tensor) or None when there are none."""
        key = (step, key_offset, keys)
        if key not in self.layouts:
            inside = hide[:, key_offset: key_offset + keys]
            single = inside.sum(dim=1) == 1
            at = key_offset + inside[single].float().argmax(dim=1)
            several = ~single if not bool(single.all()) else None
            self.layouts[key] = (single.cpu().numpy(), at.cpu().numpy(), several)
        return self.layouts[key]

    def finish(self, capture, generated: list, progress: bool) -> None:
        """Every (step, layer) record. The generated positions' scales and Gram matrices first, one product per
        layer; then the one-position units of every step from them, in numpy."""
        import numpy as np
        import torch

        scales, grams = {}, {}
        for layer in self.scales:
            later = self.later.pop(layer, [])
            if later:
                self._read_positions(layer, torch.cat(later, dim=1))  # (KVH, steps - 1, d)
            scales[layer] = torch.cat(self.scales[layer]).cpu().numpy()  # (P, H)
            if self.block:
                grams[layer] = torch.cat(self.grams[layer]).cpu().numpy()  # (P, H, H)
        alphas, blocks = self._step_alphas(grams)
        for step, layer, _, _, (single, at, _) in self.softmaxes:
            count, alpha = single.shape[0], alphas[(step, layer)]  # (H, P): the step's weights on every position
            weights = np.zeros((self.heads, count), dtype=np.float32)
            head_norms = np.zeros_like(weights)
            weights[:, single] = alpha[:, at]
            head_norms[:, single] = alpha[:, at] * scales[layer][at].T
            block_norms = None
            if self.block:
                block_norms = np.zeros(count, dtype=np.float32)
                block_norms[single] = blocks[(step, layer)][at]
            if (step, layer) in self.mixed:
                w, hn, bn = (t.cpu().numpy() if t is not None else None for t in self.mixed.pop((step, layer)))
                weights[:, ~single], head_norms[:, ~single] = w, hn
                if self.block:
                    block_norms[~single] = bn
            self.records.append((step, layer, weights, head_norms, block_norms))
        self.softmaxes.clear()

    def _step_alphas(self, grams: dict) -> tuple:
        """Per (step, layer): the softmax weights (H, P) on every position so far (0 outside the step's keys), and
        with Block sqrt(alpha^T M_j alpha) (P,) for each position j, all steps of a layer in one product."""
        import numpy as np

        by_layer = {}
        for step, layer, offset, probs, _ in self.softmaxes:
            by_layer.setdefault(layer, []).append((step, offset, probs.cpu().numpy()))
        alphas, blocks = {}, {}
        for layer, entries in by_layer.items():
            positions = max(offset + probs.shape[1] for _, offset, probs in entries)
            alpha = np.zeros((len(entries), self.heads, positions), dtype=np.float32)  # (steps, H, P)
            for i, (_, offset, probs) in enumerate(entries):
                alpha[i, :, offset: offset + probs.shape[1]] = probs
            if self.block:
                mixed = np.einsum("shp,phg->sgp", alpha, grams[layer][:positions])  # M_j alpha per step
                quadratic = np.sqrt(np.clip((mixed * alpha).sum(axis=1), 0, None))  # (steps, P)
            for i, (step, _, _) in enumerate(entries):
                alphas[(step, layer)] = alpha[i]
                if self.block:
                    blocks[(step, layer)] = quadratic[i]
        return alphas, blocks

    def variant_names(self) -> list:
        return variant_names(self.groups, self.heads)

    def table(self, token_map):
        """One row per (generation_step, layer, unit, variant), in the order Mean, Block, each head."""
        import numpy as np

        if not self.records:
            return variant_table([], [], [], self.columns)
        steps = max(r[0] for r in self.records) + 1
        units = self.plan.units(steps - 1, token_map.text)
        entries = []
        for step, layer, weights, head_norms, block_norms in self.records:
            mean = weights.mean(axis=0, keepdims=True)  # Mean and Block: the heads' mean weight
            rows = {"Mean": (mean, head_norms.mean(axis=0, keepdims=True)), "Heads": (weights, head_norms),
                    "Block": (mean, block_norms[None] if block_norms is not None else None)}
            chosen = [rows[g] for g in self.groups]
            entries.append((step, layer, {"attention": np.concatenate([c[0] for c in chosen]),  # (V, N)
                                          "attention_norm": np.concatenate([c[1] for c in chosen])}))
        return variant_table(entries, units, self.variant_names(), self.columns)

    def rows_explained(self, steps: int) -> str:
        what = " and ".join("each head" if g == "Heads" else g for g in self.groups)
        return per_step_rows(self.plan, steps, len(self.layers), len(self.variant_names()), f"variants ({what})")

    def metadata(self) -> dict:
        return {"attention_variants": self.groups}

    def check(self, capture, k: int, table) -> dict:
        """Recompute k distinct random (step, layer) records, every unit, with the model's eager attention, and
        compare them with the table's rows."""
        from ..reference import check_draws, reference_attention_error

        checked = []
        for index, _ in check_draws([1] * len(self.records), k):
            step, layer = self.records[index][:2]
            written = written_values(table, step, layer, ("attention", "attention_norm"))
            error = reference_attention_error(self.loaded.model, capture, self.plan, step, layer, written)
            checked.append({"step": step, "layer": layer, "max_error": error})
        return {"checked": checked, "max_error": max(c["max_error"] for c in checked)}
