"""The encoder measure's engine: a unit's tower tokens hidden from one vision block's attention, for every query
of the picture, and how far the block's update moves.

Inside a tower block every query of a picture is read, not one last position: hiding unit U changes all L
queries of U's picture. Per picture (segment) and block the scores are computed once, (H, L, L); for a batch of
units the masked softmax is taken with U's key columns at -inf, (n, H, L, L), and the attention output, the
block's projection and its MLP run on all L rows of each unit: that is the floor (the MLP of every changed
row), and the reason the masked softmax itself is no saving to chase. A query whose every key is hidden (a
unit holding the whole picture) receives no attention: its attention output is zero.

For each unit and variant (Full: the block's update, Attn: the attention block's output, Head_h: head h
before the projection) the distances are taken over the picture's queries flattened into one vector, once
over all of them and once over the queries outside the unit (what the rest of the picture takes from it):

    l2 = || masked - base ||,  cosine = 1 - <base, masked> / (|base| |masked|),  base_norm = |base|

summed in float64 from per-query float32 parts (a unit spanning several pictures sums over each of them). The
queries are every query of the pictures the unit touches: in a block that attends within windows (Qwen2.5-VL)
the other windows of the picture do not change, and count with their unchanged values.
"""

import torch

QUERY_SETS = ("all", "outside")


def measure_block(tower, record, index: int, units: list, num_variants: int, budget_bytes: int) -> dict:
    """Block `index` of the tower with each unit's tower tokens (LongTensor) hidden in turn. Returns
    {'l2', 'cos', 'base_norm'}: float64 (2, V, N) arrays, V = Full, Attn, then each head, N = len(units),
    the first axis the query sets (all of the picture's queries, those outside the unit)."""
    block, anatomy = tower.blocks[index], tower.anatomy
    x, kwargs = record.flat(index), record.kwargs[index]  # (S, D): pictures of a batch one after the other
    q, k, v = anatomy.attention_inputs(block, x, kwargs)  # (H, S, d) float32
    heads, _, d = q.shape
    scale = anatomy.scaling(block)
    sums = torch.zeros(4, 2, num_variants, len(units), dtype=torch.float64)  # diff², base², masked², dot
    base2_token = torch.zeros(num_variants, x.shape[0], dtype=torch.float64)  # each query's base², per variant
    covered = [set() for _ in units]  # the segments each unit was measured in
    for start, end in anatomy.segments(kwargs, tuple(record.inputs[index].shape)):
        local = [(u, (cells[(cells >= start) & (cells < end)] - start)) for u, cells in enumerate(units)]
        local = [(u, hide) for u, hide in local if len(hide)]
        length = end - start
        xs = x[start:end]
        scores = (q[:, start:end] @ k[:, start:end].transpose(-1, -2)) * scale  # (H, L, L)
        values = v[:, start:end]  # (H, L, d)
        base_heads = scores.softmax(-1) @ values  # (H, L, d)
        base = _variants(anatomy, block, xs, base_heads.unsqueeze(0))  # (1, 2, L, D), (1, H, L, d)
        base2_token[:, start:end] = torch.cat([part[0].square().sum(-1) for part in base]).double().cpu()
        per_unit = 4 * (3 * heads * length * length + 12 * length * x.shape[-1] + num_variants * length * d)
        chunk = max(1, budget_bytes // max(per_unit, 1))
        for first in range(0, len(local), chunk):
            part = local[first:first + chunk]
            hide = torch.zeros(len(part), length, dtype=torch.bool, device=x.device)
            for row, (u, cells) in enumerate(part):
                hide[row, cells.to(x.device)] = True
                covered[u].add((start, end))
            masked = scores.unsqueeze(0).masked_fill(hide[:, None, None, :], float("-inf"))  # (n, H, L, L)
            weights = masked.softmax(-1)
            if hide.all(-1).any():  # a row with no key left (the unit holds the whole segment): no attention
                weights = torch.nan_to_num(weights, nan=0.0)
            changed = _variants(anatomy, block, xs, weights @ values)  # (n, 2, L, D), (n, H, L, d)
            _accumulate(sums, [u for u, _ in part], base, changed, ~hide)
    # A windowed block leaves the unit's pictures' other windows as they were: their queries count, unchanged.
    for u, cells in enumerate(units):
        for low, high in tower.pictures:
            if not ((cells >= low) & (cells < high)).any():
                continue
            untouched = torch.ones(high - low, dtype=torch.bool)
            for start, end in covered[u]:
                untouched[max(start, low) - low:max(min(end, high) - low, 0)] = False
            same = base2_token[:, low:high][:, untouched].sum(-1)  # (V,)
            for k in (1, 2, 3):  # base², masked², dot: the same vector on both sides
                sums[k, :, :, u] += same
    diff2, base2, masked2, dot = sums
    norms = base2.sqrt() * masked2.sqrt()
    cos = torch.where(norms > 0, 1 - dot / norms.clamp_min(1e-300), (diff2 > 0).double())
    return {"l2": diff2.sqrt().numpy(), "cos": cos.numpy(), "base_norm": base2.sqrt().numpy()}


def _variants(anatomy, block, xs, heads_out) -> tuple:
    """(Full and Attn (n, 2, L, D), each head's output (n, H, L, d)) in float32 from the per-head attention
    outputs (n, H, L, d)."""
    n, heads, length, d = heads_out.shape
    o = heads_out.permute(0, 2, 1, 3).reshape(n, length, heads * d)
    attended = anatomy.attention_output(block, o)  # (n, L, D)
    full = anatomy.after_attention(block, xs, attended) - xs  # (n, L, D)
    return torch.stack([full.float(), attended.float()], dim=1), heads_out.float()


def _accumulate(sums, units: list, base: tuple, changed: tuple, outside) -> None:
    """Add the per-query parts of each unit's distances over all queries and over those outside it; the
    variants' axis is Full and Attn (the first of each pair), then the heads."""
    index = torch.tensor(units)
    out = outside[:, None, :].double()  # (n, 1, L)
    first = 0
    for b, c in zip(base, changed):  # (1 or n, V', L, width)
        parts = ((c - b).square().sum(-1).double(), b.square().sum(-1).double().expand(c.shape[:3]),
                 c.square().sum(-1).double(), (c * b).sum(-1).double())  # (n, V', L) each
        span = slice(first, first + c.shape[1])
        for k, part in enumerate(parts):
            sums[k, 0, span, index] += part.sum(-1).T.cpu()
            sums[k, 1, span, index] += (part * out).sum(-1).T.cpu()
        first += c.shape[1]
