"""The encoder-flow measure's engine: a picture unit's patches hidden from every query's attention in a window of
vision blocks, then the rest of the tower, the merger or projector and the language model run to the prediction;
and the pre-fusion ablation of Neo et al. (ICLR 2025): the unit's image tokens replaced after the projector by
the picture's mean image token, or by zero (for Qwen3-VL, their DeepStack rows too).

A batch of n configurations is one forward of the whole model on n copies of the prompt: the model's own code
runs the tower, the projector and the language model; the engine only decides the attention of the window's
blocks (copy i hides its unit's keys, through the attention hook) or edits the image tokens where the language
model receives them (a forward pre-hook on it: after the projector and any packing, Qwen3-VL's DeepStack rows
with them).

The blocks before the window see nothing of the knockout, so they are not run again: for the batch's forward they
return what they returned in the recorded pass, repeated for the copies (replayed_prefix); for the ablation after
the projector, no block runs again. Everything from the window on changes with the unit: the rest of the tower (a
hidden key moves every query of its picture), the projector and the language model's prefill from the first image
token on. That bounds the gain over one forward per (unit, window): the prefix is on average about half the tower,
and nothing of the language model.
"""

from contextlib import contextmanager

import torch

from .anatomy import ATTENTION_NAME, AttentionHook, attention_hook, register_attention, text_model
from .flow import metrics_of
from .masks import prompt_mask

MODES = ("mean", "zero")  # what replaces a unit's image tokens after the projector


class PromptAttention(AttentionHook):
    """The language model's attention as in the unblocked run: with --vision-attention bidirectional each
    image's tokens see each other during the prompt (blocks: the picture of each position, or None)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        return run_default(prompt_mask(query, key, attention_mask, self.blocks, sliding_window))


class WindowKeyMask(PromptAttention):
    """The attention of one batched forward: in the window's vision blocks copy i hides units[i] from every query
    (a query with no key left gets no attention); the other vision blocks are the model's own, the language
    model's as in the unblocked run."""

    def __init__(self, blocks, tower, segments: dict, hidden: list, window: set):
        super().__init__(blocks)
        self.block_of = {id(b.get_submodule(tower.anatomy.attention)): i for i, b in enumerate(tower.blocks)}
        self.segments, self.hidden, self.window = segments, hidden, window
        self.seen = {}  # block -> segments of its calls so far (the calls come in the segments' order)

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        block = self.block_of.get(id(module))
        if block is None:
            return super().attend(module, query, key, value, attention_mask, scaling, sliding_window, run_default)
        if block not in self.window:
            self.seen[block] = self.seen.get(block, 0) + query.shape[0]
            return run_default(attention_mask)
        segments = self.segments[block]  # one copy's segments
        first = self.seen.get(block, 0)
        self.seen[block] = first + query.shape[0]
        allowed = torch.ones(query.shape[0], 1, 1, key.shape[-2], dtype=torch.bool, device=query.device)
        for row in range(query.shape[0]):
            copy, segment = divmod(first + row, len(segments))
            start, end = segments[segment]
            cells = self.hidden[copy]
            allowed[row, 0, 0, (cells[(cells >= start) & (cells < end)] - start).to(query.device)] = False
        scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
        weights = torch.nan_to_num(scores.masked_fill(~allowed, float("-inf")).softmax(-1), nan=0.0)
        return (weights @ value.float()).transpose(1, 2).to(query.dtype)  # (B, L, H, d), as sdpa returns it


def batched_kwargs(kwargs: dict, n: int) -> dict:
    """The prompt's model inputs (on the model's device) for n copies: every tensor repeated along its first axis
    (pictures of each copy after those of the one before)."""
    return {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in kwargs.items()}


def repeated(output, copies: int):
    """A block's recorded output for `copies` copies of the prompt (each tensor repeated along its first axis, as
    batched_kwargs repeats the pixels), or None where its type is not one this knows."""
    if isinstance(output, torch.Tensor):
        return output.repeat(copies, *[1] * (output.dim() - 1))
    if isinstance(output, tuple | list):
        parts = [x if x is None else repeated(x, copies) for x in output]
        return None if any(p is None and x is not None for p, x in zip(parts, output)) else type(output)(parts)
    return None


@contextmanager
def replayed_prefix(tower, record, upto: int):
    """Blocks 0 .. upto - 1 return their recorded output, repeated for the batch's copies, without computing: the
    knockout starts at block `upto`, so what they give is the unblocked run's, copy for copy. Hooks on a block still
    run (hidden states a family collects from them, Qwen3-VL's DeepStack taps after them read the replayed output).
    A call whose input is not the recorded one repeated (another layout) computes as before."""

    def replay(index, computed):
        recorded = record.inputs[index]

        def forward(*args, **kwargs):
            given = args[0] if args else kwargs["hidden_states"]
            copies, left = divmod(given.shape[0], recorded.shape[0])
            out = None if left or given.shape[1:] != recorded.shape[1:] else repeated(record.outputs[index], copies)
            return computed(*args, **kwargs) if out is None else out
        return forward

    saved = {}
    try:
        for index in range(upto):
            block = tower.blocks[index]
            saved[index] = block.__dict__.get("forward")  # a forward set on the instance (accelerate's hooks)
            block.forward = replay(index, block.forward)
        yield
    finally:
        for index, previous in saved.items():
            block = tower.blocks[index]
            del block.forward
            if previous is not None:
                block.forward = previous


def last_hidden(loaded, kwargs: dict) -> torch.Tensor:
    """The final hidden state at the last position of each copy, (n, D), from one forward of the model."""
    out = loaded.model.model(**kwargs, use_cache=False)
    return out.last_hidden_state[:, -1]


def window_knockout(loaded, kwargs: dict, blocks, tower, record, units: list, window: range, base_logits, target: int,
                    chunk: int) -> dict:
    """Metrics of each unit's tower tokens hidden in the window's blocks, chunk units per forward."""
    segments = {b: tower.anatomy.segments(record.kwargs[b], tuple(record.inputs[b].shape)) for b in window}
    config = tower.module.config
    previous = config._attn_implementation
    register_attention()
    parts = []
    try:
        config._attn_implementation = ATTENTION_NAME
        for first in range(0, len(units), chunk):
            part = units[first:first + chunk]
            with attention_hook(WindowKeyMask(blocks, tower, segments, part, set(window))), \
                    replayed_prefix(tower, record, window.start):
                hidden = last_hidden(loaded, batched_kwargs(kwargs, len(part)))
            parts.append(metrics_of(loaded, hidden, base_logits, target))
    finally:
        config._attn_implementation = previous
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def replaced_after_projector(loaded, kwargs: dict, blocks, tower, record, units: list, pictures: list, mode: str,
                             base_logits, target: int, chunk: int) -> dict:
    """Metrics of each unit's image tokens (units: their positions) replaced, where the language model receives
    them, by the mean of their picture's image tokens (mode 'mean'; pictures: each picture's image positions) or
    by zero: its input embeddings there and, for Qwen3-VL, the DeepStack rows of those positions. The tower is the
    unblocked run's: every block replays its recorded output."""
    text = text_model(loaded.model)
    parts = []
    for first in range(0, len(units), chunk):
        part = units[first:first + chunk]

        def edit(module, args, given):
            given = dict(given)
            embeds = given["inputs_embeds"].clone()  # (n, S, D)
            stacks = given.get("deepstack_visual_embeds")
            if stacks is not None:  # rows in image-position order, copies one after the other
                image = torch.nonzero(given["visual_pos_masks"][0]).flatten()
                row_of = torch.full((embeds.shape[1],), -1, dtype=torch.long, device=image.device)
                row_of[image] = torch.arange(len(image), device=image.device)
                stacks = [stack.clone() for stack in stacks]
            for copy, positions in enumerate(part):
                for picture in pictures:
                    mine = positions[torch.isin(positions, picture)]
                    if not len(mine):
                        continue
                    targets = [(embeds[copy], mine, picture)]
                    if stacks is not None:
                        base = copy * len(image)
                        targets += [(stack, base + row_of[mine.to(row_of.device)],
                                     base + row_of[picture.to(row_of.device)]) for stack in stacks]
                    for tensor, rows, group in targets:
                        rows = rows.to(tensor.device)
                        tensor[rows] = tensor[group.to(tensor.device)].mean(0) if mode == "mean" else 0
            given["inputs_embeds"] = embeds
            if stacks is not None:
                given["deepstack_visual_embeds"] = stacks
            return args, given

        handle = text.register_forward_pre_hook(edit, with_kwargs=True)
        try:
            with attention_hook(PromptAttention(blocks)), replayed_prefix(tower, record, len(tower.blocks)):
                hidden = last_hidden(loaded, batched_kwargs(kwargs, len(part)))
        finally:
            handle.remove()
        parts.append(metrics_of(loaded, hidden, base_logits, target))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
