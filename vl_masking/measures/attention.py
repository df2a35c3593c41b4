"""The attention measure: what the last query attends to, per unit, from the unblocked pass.

For each generation step, measured layer and head h, with alpha[h, j] the last query's softmax weight on
key j (the model's own mask applied: causal, bidirectional images, sliding windows) and U a unit:

    attention[h, U]       = sum_{j in U} alpha[h, j]
    attention_norm[h, U]  = || W_O,h  sum_{j in U} alpha[h, j] v_j ||     (Kobayashi et al., EMNLP 2020)

W_O,h is head h's slice of o_proj (its bias belongs to no token and is left out). Rows: variant Head_h per
head, and Mean, whose attention is the mean over heads and whose attention_norm is the norm of the unit's
contribution to the whole attention block's output, || sum_h W_O,h u_h || (the block's norm is not a mean of
the heads' norms: their vectors add).

The engine already has, per layer and step, the last query and the layer's keys and values (the Capture of
the unblocked generation): one softmax row per head, no S x S matrix, no eager attention. A token unit's
contribution is alpha[h, j] P[h, j] with P[h, j] = W_O,h v_j, which never changes once position j exists: the
Gram matrix M_j = P_j P_j^T (H x H) is computed once per position and layer, and each step then costs
alpha^T M_j alpha per unit (block) and alpha[h, j] sqrt(M_j[h, h]) (head h). A unit of several positions mixes
its values under the step's weights; its per-head norms go through the R factor of W_O,h = Q R (||W_O,h u|| =
||R u||, a d x d product instead of D x d, once per layer), its block norm through o_proj's weight.
The reference (reference.reference_attention, and in the tests the model's own output_attentions) computes
the same from the model's eager attention.
"""

from .base import Measure, Metric, register
from .layer import per_step_rows, variant_table

ATTENTION_COLUMNS = ["generation_step", "layer", "token_position", "token_masked", "token_type", "image_index",
                     "grid_row", "grid_col", "variant", "attention", "attention_norm", "unit", "unit_kind",
                     "unit_size", "unit_positions", "grid_rows", "grid_cols"]


def unit_attention(lq, hide, weight, r_factor, memory_budget_bytes: int):
    """Attention weight and contribution norm of every unit of one layer, each unit's values mixed on its own.

    lq: the knockout.LastQuery of the layer; hide: (N, length) bool, row n the positions of unit n;
    weight: o_proj's weight (D, H*d) float32; r_factor: (H, d, d), the R of each head's slice.
    Returns weights (H, N), head norms (H, N) and block norms (N,), float32.
    """
    import torch

    from ..knockout import last_query_logits, mix_values, usable_memory

    probs = torch.softmax(last_query_logits(lq), dim=-1)  # (H, S_k)
    heads, s = probs.shape
    member = hide.to(probs.device)[:, lq.key_offset: lq.key_offset + s].float()  # (N, S_k)
    weights = probs @ member.T  # (H, N)
    chunk = max(1, int(usable_memory(memory_budget_bytes, probs.device) // (4 * heads * s * 2)))
    head_norms, block_norms = [], []
    for start in range(0, member.shape[0], chunk):
        rows = member[start: start + chunk]  # (n, S_k)
        u = mix_values(probs.unsqueeze(1) * rows.unsqueeze(0), lq.v)  # (H, n, d): sum_j alpha_hj v_j over U
        head_norms.append(torch.linalg.vector_norm(torch.einsum("hij,hnj->hni", r_factor, u), dim=-1))
        block = u.transpose(0, 1).reshape(u.shape[1], -1) @ weight.T  # (n, D): sum_h W_O,h u_h
        block_norms.append(torch.linalg.vector_norm(block, dim=-1))
    return weights, torch.cat(head_norms, dim=1), torch.cat(block_norms)


def position_grams(v, weight, heads: int, memory_budget_bytes: int):
    """(S, H, H): for each position j, the Gram matrix of its heads' output vectors P[h] = W_O,h v_(kv(h), j).

    With these, a one-position unit's contribution needs no D-wide product per step: its head norms are
    alpha_h sqrt(M[h, h]) and its block norm sqrt(alpha^T M alpha). v: (KVH, S, d); weight: (D, H*d).
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


def head_r_factors(weight, heads: int):
    """(H, d, d): R of the QR factorisation of each head's slice W_O,h (D, d) of o_proj's weight (D, H*d)."""
    import torch

    d_model, width = weight.shape
    slices = weight.reshape(d_model, heads, width // heads).permute(1, 0, 2)  # (H, D, d)
    return torch.linalg.qr(slices.double(), mode="r")[1].float()


@register
class AttentionMeasure(Measure):
    """The unblocked attention of the last query on each unit: its weight and its contribution's norm."""

    name = "attention"
    help = "the last query's attention weight on each unit and the norm of the unit's contribution"
    columns = ATTENTION_COLUMNS
    series_column, series_label = "variant", "head"
    normalise = "step"  # weights sum to one in every layer and head: one scale across the layers
    metrics = (Metric("attention", "attention weight", "attention"),  # summed over the unit's keys
               Metric("attention_norm", "attention contribution norm", "attention_norm"))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []  # (step, layer, weights (H, N), head norms (H, N), block norms (N,))
        self.r_factors = {}  # layer -> (H, d, d), for units of several positions
        self.grams = {}  # layer -> (positions so far, H, H), for units of one position
        self._layout_key, self._layout_value = None, None
        self.heads = self.loaded.text_config.num_attention_heads

    def capture_options(self) -> dict:
        return {"on_layer": True, "keep_layer_inputs": self.settings.check > 0}

    def on_layer(self, step: int, layer: int, pending: dict, length: int) -> None:
        """Token units (one position) through the cached per-position Gram matrices; the others mixed one by one."""
        import torch

        from ..knockout import last_query_logits

        lq = pending["last_query"]
        weight = pending["attention"].o_proj.weight.to(lq.q.device).float()
        hide = self.plan.hide_mask(step, lq.q.device)
        single, at, any_single, any_several = self._layout(step, hide, lq.key_offset, lq.k.shape[1])
        count = hide.shape[0]
        weights = torch.zeros(self.heads, count, device=lq.q.device)
        head_norms, block_norms = torch.zeros_like(weights), torch.zeros(count, device=lq.q.device)
        if any_single:
            probs = torch.softmax(last_query_logits(lq), dim=-1)  # (H, S_k)
            grams = self._grams(layer, lq, weight)[lq.key_offset + at]  # (n, H, H)
            alpha = probs[:, at]  # (H, n)
            weights[:, single] = alpha
            head_norms[:, single] = alpha * torch.diagonal(grams, dim1=1, dim2=2).clamp_min(0).sqrt().T
            a = alpha.T.unsqueeze(-1)  # (n, H, 1)
            quadratic = torch.bmm(a.transpose(1, 2), torch.bmm(grams, a)).reshape(-1)  # alpha^T M alpha
            block_norms[single] = quadratic.clamp_min(0).sqrt()
        several = ~single
        if any_several:
            if layer not in self.r_factors:
                self.r_factors[layer] = head_r_factors(weight, self.heads)
            w, hn, bn = unit_attention(lq, hide[several], weight, self.r_factors[layer], self.memory_budget_bytes)
            weights[:, several], head_norms[:, several], block_norms[several] = w, hn, bn
        self.records.append((step, layer, weights, head_norms, block_norms))

    def _layout(self, step: int, hide, key_offset: int, keys: int) -> tuple:
        """Which units are one position among the keys, and where (the same in every layer of a step, unless a
        sliding window drops keys): (single (N,) bool, their key indices, any single, any not)."""
        key = (step, key_offset, keys)
        if self._layout_key != key:
            inside = hide[:, key_offset: key_offset + keys]
            single = inside.sum(dim=1) == 1
            at = inside[single].float().argmax(dim=1)
            self._layout_key, self._layout_value = key, (single, at, bool(single.any()), not bool(single.all()))
        return self._layout_value

    def _grams(self, layer: int, lq, weight):
        """The per-position Gram matrices of every position so far (values never change once a position exists)."""
        import torch

        known = self.grams.get(layer)
        have = 0 if known is None else known.shape[0]
        end = lq.key_offset + lq.v.shape[1]
        if have < end:
            new = position_grams(lq.v[:, have - lq.key_offset:], weight, self.heads, self.memory_budget_bytes)
            self.grams[layer] = new if known is None else torch.cat([known, new])
        return self.grams[layer]

    def variant_names(self) -> list:
        return ["Mean", *[f"Head_{h}" for h in range(self.heads)]]

    def table(self, token_map):
        """One row per (generation_step, layer, unit, variant): Mean first, then each head."""
        import torch

        if not self.records:
            return variant_table([], [], [], self.columns)
        steps = max(r[0] for r in self.records) + 1
        units = self.plan.units(steps - 1, token_map.text)
        entries = [(step, layer, {
            "attention": torch.cat([weights.mean(dim=0, keepdim=True), weights]).cpu().numpy(),  # (V, N)
            "attention_norm": torch.cat([block_norms[None], head_norms]).cpu().numpy(),
        }) for step, layer, weights, head_norms, block_norms in self.records]
        return variant_table(entries, units, self.variant_names(), self.columns)

    def rows_explained(self, steps: int) -> str:
        return per_step_rows(self.plan, steps, len(self.layers), self.heads + 1, "variants (Mean and each head)")

    def metadata(self) -> dict:
        return {"attention_variants": "Mean: attention = mean over heads, attention_norm = norm of the whole "
                                      "block's contribution (o_proj of all heads, without its bias)"}

    def check(self, capture, k: int) -> dict:
        """Recompute k random (step, layer) records, every unit, with the model's eager attention."""
        import random

        from ..reference import reference_attention_error

        rng = random.Random(0)
        checked = []
        for _ in range(k):
            step, layer, weights, head_norms, block_norms = self.records[rng.randrange(len(self.records))]
            error = reference_attention_error(self.loaded.model, capture, self.plan, step, layer,
                                              (weights, head_norms, block_norms))
            checked.append({"step": step, "layer": layer, "max_error": error})
        return {"checked": checked, "max_error": max(c["max_error"] for c in checked)}
