"""The unblocked model's prompt attention, built in one place: which keys each query row may attend to.

Causal, and with --vision-attention bidirectional each image's tokens (a picture, all its views: `blocks`, the
picture of each prompt position, -1 elsewhere) see each other during the prompt; in a sliding-window layer only
keys inside the window, an image's own tokens included (as Gemma 3's own mask has it). The capture adds the
image blocks to the model's own mask during the prefill; the flow engine rebuilds the whole mask for the rows it
re-runs. (reference.py builds its own, on purpose: it shares no code with the engines.)
"""

import torch


def same_image(blocks, length: int, sliding_window=None, device=None) -> torch.Tensor:
    """(length, length) bool: query and key are tokens of one image (inside the sliding window, if any)."""
    padded = torch.full((length,), -1, dtype=torch.long, device=device)
    padded[: blocks.numel()] = blocks.to(device)
    same = (padded[:, None] == padded[None, :]) & (padded[:, None] >= 0)
    if sliding_window:
        pos = torch.arange(length, device=device)
        same &= pos[:, None] - pos[None, :] < sliding_window
    return same


def allowed_keys(length: int, vision_blocks=None, sliding_window=None, device=None) -> torch.Tensor:
    """(S, S) bool, the unblocked pass's attention: causal (inside the sliding window, if any), plus each image
    block bidirectional when the prompt was prefilled so."""
    pos = torch.arange(length, device=device)
    allowed = pos[None, :] <= pos[:, None]
    if sliding_window:
        allowed &= pos[:, None] - pos[None, :] < sliding_window
    if vision_blocks is not None:
        allowed |= same_image(vision_blocks, length, sliding_window, device)
    return allowed


def prompt_mask(query, key, attention_mask, blocks, sliding_window=None):
    """A prompt prefill's mask in bidirectional mode (blocks: the picture of each position, or None): the model's
    mask, plus each image's tokens see each other (in a sliding-window layer only inside the window, as Gemma 3's
    own mask has it); any other call's mask unchanged."""
    q_len, k_len = query.shape[2], key.shape[2]
    if blocks is None or q_len == 1 or k_len != q_len or q_len != blocks.numel():
        return attention_mask
    if attention_mask is None:
        base = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
    else:
        base = attention_mask[0, 0]
        if base.dtype != torch.bool:
            base = base > torch.finfo(base.dtype).min / 2
    return (base | same_image(blocks, q_len, sliding_window, query.device))[None, None]
