"""The vision tower as the encoder measure sees it: its blocks, how one block computes (the family's anatomy),
which tower tokens lie under each language-model token, and one recorded pass of the tower.

A family's adapter (models/) describes its tower with a Tower; this module records a pass (the input and the
keyword arguments of every block, from forward pre-hooks: nothing is patched) and knows nothing of a family.

    record = tower.record(model_kwargs)       # one pass of the tower on the prompt's pictures
    record.inputs[b]   (S, D)                 # block b's input, every picture's tokens in the tower's order
    record.kwargs[b]                          # what the block was called with (segments, rotary cos/sin)
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
    # kwargs -> [(start, end)]: the runs of tokens that attend to each other in this block (a picture, a window)
    segments: object
    scaling: object  # block -> the attention's score scale


@dataclass
class TowerRecord:
    inputs: list  # per block: its input (S, D)
    kwargs: list  # per block: its keyword arguments


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

    def record(self, model_kwargs: dict) -> TowerRecord:
        """Run the tower once, keeping each block's input and keyword arguments."""
        inputs, kwargs = [None] * len(self.blocks), [None] * len(self.blocks)

        def keep(index):
            def hook(module, args, given):
                inputs[index] = (args[0] if args else given["hidden_states"]).detach()
                kwargs[index] = dict(given)
            return hook

        handles = [block.register_forward_pre_hook(keep(i), with_kwargs=True) for i, block in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                self.run(model_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return TowerRecord(inputs, kwargs)


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
