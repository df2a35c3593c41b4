"""The vision tower as the encoder measure sees it: its blocks, how one block computes (the family's anatomy),
which tower tokens lie under each language-model token, and one recorded pass of the tower.

A family's adapter (models/) describes its tower with a Tower; this module records a pass (the input and the
keyword arguments of every block, from forward pre-hooks: nothing is patched) and knows nothing of a family.

    record = tower.record(model_kwargs)       # one pass of the tower on the prompt's pictures
    record.inputs[b]   (S, D)                 # block b's input, every picture's tokens in the tower's order
    record.kwargs[b]                          # what the block was called with (segments, rotary cos/sin)
    record.outputs[b]                         # what the block returned (a tensor, or the family's tuple)
    tower.cells[i][j]  (m,) int               # picture i, language-model token j: the tower tokens under it
"""

from dataclasses import dataclass, field

import torch


@dataclass
class BlockAnatomy:
    """How a block of one family computes, split where the knockout needs it. Each function takes the block
    module and what the recorded pass gave it; shapes: S tower tokens, D width, H heads of d."""

    # (block, x (S, D), kwargs) -> q, k, v (H, S, d) in float32, after the norm and any rotary embedding
    attention_inputs: object
    # (block, o (..., S, H * d) in float32) -> the attention block's output (..., S, D), in the block's dtype
    attention_output: object
    # (block, x (S, D), attention output (..., S, D)) -> the block's output (..., S, D)
    after_attention: object
    # (kwargs, shape of the recorded input) -> [(start, end)]: the runs of tokens (of the input flattened to
    # (S, D)) that attend to each other in this block: a picture, a window, a batch entry
    segments: object
    scaling: object  # block -> the attention's score scale
    projection: str = "attn.proj"  # the projection after the heads (its input: the heads), inside ...

    @property
    def attention(self) -> str:
        """... the block's attention module (its output: Attn)."""
        return self.projection.rsplit(".", 1)[0]


def clip_anatomy() -> BlockAnatomy:
    """The encoder layer of CLIP and SigLIP towers (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Gemma 3, Idefics3):
    layer_norm1, self_attn (q, k and v projections, out_proj), layer_norm2, mlp; no rotary embedding; the
    pictures (or tiles) are a batch, and each attends to itself."""

    def attention_inputs(block, x, kwargs):
        attention, h = block.self_attn, block.layer_norm1(x)
        split = lambda t: t.reshape(x.shape[0], attention.num_heads, -1).transpose(0, 1).float()  # noqa: E731
        return split(attention.q_proj(h)), split(attention.k_proj(h)), split(attention.v_proj(h))

    def after_attention(block, x, attended):
        hidden = x + attended.to(x.dtype)
        return hidden + block.mlp(block.layer_norm2(hidden))

    def segments(kwargs, shape):
        return [(i * shape[1], (i + 1) * shape[1]) for i in range(shape[0])] if len(shape) == 3 else [(0, shape[0])]

    return BlockAnatomy(attention_inputs=attention_inputs,
                        attention_output=lambda b, o: b.self_attn.out_proj(o.to(b.self_attn.out_proj.weight.dtype)),
                        after_attention=after_attention, segments=segments, scaling=lambda b: b.self_attn.scale,
                        projection="self_attn.out_proj")


@dataclass
class TowerRecord:
    inputs: list  # per block: its input, (S, D) or (pictures, S, D)
    args: list  # per block: its other positional arguments
    kwargs: list  # per block: its keyword arguments
    outputs: list  # per block: what it returned (mostly the next block's input, the same tensor: no copy)

    def flat(self, index: int) -> torch.Tensor:
        """Block `index`'s input as (S, D): a batch of pictures one after the other."""
        return self.inputs[index].reshape(-1, self.inputs[index].shape[-1])


@dataclass
class Tower:
    """One family's tower in one loaded model, for the prompt's pictures."""

    module: torch.nn.Module  # the vision model
    blocks: torch.nn.ModuleList
    anatomy: BlockAnatomy
    num_heads: int
    cells: list  # per picture, per language-model token: the tower tokens under it (LongTensor), in the blocks' order
    pictures: list  # per picture: (start, end) of its tower tokens in the blocks' order
    run: object  # model_kwargs -> the tower's forward on the prompt's pictures
    measured: list = field(default_factory=list)  # the blocks whose output reaches the language model
    note: str | None = None  # why the others are not measured

    def record(self, model_kwargs: dict) -> TowerRecord:
        """Run the tower once, keeping each block's input, keyword arguments and output."""
        inputs, rest, kwargs, outputs = ([None] * len(self.blocks) for _ in range(4))

        def keep(index):
            def hook(module, args, given):
                given = dict(given)
                inputs[index] = (args[0] if args else given.pop("hidden_states")).detach()
                rest[index], kwargs[index] = tuple(args[1:]), given
            return hook

        def returned(index):
            def hook(module, args, output):
                outputs[index] = output
            return hook

        handles = [block.register_forward_pre_hook(keep(i), with_kwargs=True) for i, block in enumerate(self.blocks)]
        handles += [block.register_forward_hook(returned(i)) for i, block in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                self.run(model_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return TowerRecord(inputs, rest, kwargs, outputs)


def feature_layer_refusal(config) -> str | None:
    """tower_refusal of a family whose language model takes `vision_feature_layer`'s block: a list of blocks
    (their features concatenated) is not reproduced."""
    if not isinstance(config.vision_feature_layer, int):
        return ("the encoder measure does not reproduce features concatenated from several blocks "
                "(vision_feature_layer is a list)")
    return None


def feature_layer_blocks(family: str, config) -> tuple:
    """tower_blocks of a family whose language model takes one block's output (`vision_feature_layer`, counted
    as in hidden_states: 0 the embeddings, k block k - 1's output, -1 the last): (depth, the blocks that reach
    the language model, why the others do not)."""
    depth, layer = config.vision_config.num_hidden_layers, config.vision_feature_layer
    taken = layer % (depth + 1)
    after = f"block {taken} never reaches" if taken == depth - 1 else f"blocks {taken}-{depth - 1} never reach"
    note = None if taken == depth else (f"{family} takes block {taken - 1}'s output "
                                        f"(vision_feature_layer {layer}): {after} the language model")
    return depth, list(range(taken)), note


def shuffled_cells(shuffle, patches: int) -> torch.Tensor:
    """(tokens, k) the patches (row-major in a tile of patches x patches) that a pixel-shuffling connector puts
    under each of its tokens, read by running its own shuffle (features (1, patches, patches, 1) or
    (1, patches^2, 1) holding each patch's index) instead of assuming its order."""
    index = torch.arange(patches * patches, dtype=torch.float64)
    out = shuffle(index)
    cells = out.reshape(-1, out.shape[-1]).round().long()
    if not torch.equal(torch.sort(cells.flatten()).values, torch.arange(patches * patches)):
        raise RuntimeError("the connector's pixel shuffle could not be read as a map of patches to tokens")
    return cells


class _Stop(Exception):
    pass


def block_order(visual, embed: torch.nn.Module, first_block: torch.nn.Module, pixel_values, run_kwargs) -> torch.Tensor:
    """order[g] = the patch (in the processor's order) that a tower which reorders its tokens before the blocks
    (Qwen2.5-VL's windows) puts at position g. Found without the tower's internals: pixel values of the same
    shape with a distinct random value in every patch are embedded, and block 0's input is matched row by row
    with the embedding's output (the reordering depends on the grid only); the pass stops at block 0."""
    seen = {}

    def embedded(module, args, output):
        seen["embedded"] = output.detach()

    def block_input(module, args, given):
        seen["input"] = (args[0] if args else given["hidden_states"]).detach()
        raise _Stop

    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(pixel_values.shape, generator=generator).to(pixel_values.device, pixel_values.dtype)
    handles = [embed.register_forward_hook(embedded),
               first_block.register_forward_pre_hook(block_input, with_kwargs=True)]
    try:
        with torch.no_grad():
            visual(probe, **run_kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    a, b = seen["input"].float(), seen["embedded"].float()
    order = torch.cdist(a, b).argmin(dim=1)
    if not torch.equal(torch.sort(order).values, torch.arange(len(order), device=order.device)) or not torch.equal(a, b[order]):
        raise RuntimeError("the tower's token order could not be read from its first block")
    return order.cpu()


def picture_views(tokens) -> list:
    """Per picture, its views (models.View with their places in the sequence) in sequence order."""
    out = {}
    for view in sorted(tokens.images, key=lambda v: v.start):
        out.setdefault(view.picture, []).append(view)
    return [out[k] for k in sorted(out)]


def image_positions(tokens) -> list:
    """Per picture, the positions of its image tokens in sequence order (its views' runs; the marker text between
    the tiles of some families is not among them): row j of a picture after the projector is its j-th."""
    return [[p for view in views for p in range(view.start, view.end)] for views in picture_views(tokens)]


def picture_units(plan, tokens, tower) -> tuple:
    """The plan's picture units at step 0 that have patches (not a text unit, not a newline token) and, for each,
    its tower tokens (LongTensor)."""
    positions = image_positions(tokens)
    if [len(p) for p in positions] != [len(c) for c in tower.cells]:
        raise RuntimeError(f"the tower maps {[len(c) for c in tower.cells]} image tokens per picture, the prompt has "
                           f"{[len(p) for p in positions]}")
    row_of = {p: j for picture in positions for j, p in enumerate(picture)}
    units, cells = [], []
    for unit in plan.units(0):
        if unit.token_type != "vision":
            continue
        under = torch.cat([tower.cells[int(tokens.picture_index[p])][row_of[p]] for p in unit.positions])
        if len(under):  # a row's newline token (LLaVA-NeXT) has no patch under it either
            units.append(unit)
            cells.append(under)
    return units, cells
