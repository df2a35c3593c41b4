"""The token map: for every position, its text, type, image index and grid cell.

Image k's vision tokens are the k-th run of <|image_pad|> tokens. The language model
sees the merged patch grid of image k, (h / merge) x (w / merge) tokens in row-major
order, so token i of the run sits at row i // (w / merge), column i % (w / merge).
The grid always comes from image_grid_thw, never from a square root.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageSpan:
    index: int
    start: int  # first vision-token position
    end: int  # one past the last
    grid_rows: int
    grid_cols: int
    width: int = 0  # original image size in pixels
    height: int = 0
    path: str = ""

    def to_dict(self) -> dict:
        return {"index": self.index, "path": self.path, "token_start": self.start, "token_end": self.end,
                "grid_rows": self.grid_rows, "grid_cols": self.grid_cols,
                "width": self.width, "height": self.height}


@dataclass
class TokenMap:
    """Per-position arrays over the whole final sequence (prompt plus generated tokens)."""

    ids: np.ndarray
    text: list
    is_vision: np.ndarray  # bool
    image_index: np.ndarray  # int32, -1 for text
    grid_row: np.ndarray
    grid_col: np.ndarray
    images: list


def maskable_positions(prompt_is_vision: np.ndarray, mask_mode: str, length: int) -> np.ndarray:
    """Positions < length that --mask-mode selects; positions after the prompt are generated text."""
    is_vision = np.zeros(length, dtype=bool)
    is_vision[: len(prompt_is_vision)] = prompt_is_vision[:length]
    if mask_mode == "text":
        return np.flatnonzero(~is_vision)
    if mask_mode == "vision":
        return np.flatnonzero(is_vision)
    return np.arange(length)


def token_text(tokenizer, token_id: int) -> str:
    """What a reader expects to see: ' the' rather than 'Ġthe'; special tokens keep their names."""
    return tokenizer.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def build_token_map(tokenizer, ids, image_pad_id=None, image_grid_thw=None, merge_size=2,
                    image_sizes=(), image_paths=()) -> TokenMap:
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    is_vision = np.zeros(n, dtype=bool)
    image_index = np.full(n, -1, dtype=np.int32)
    grid_row = np.full(n, -1, dtype=np.int32)
    grid_col = np.full(n, -1, dtype=np.int32)
    images = []
    if image_grid_thw is not None and len(image_grid_thw):
        runs = _runs(ids == image_pad_id)
        if len(runs) != len(image_grid_thw):
            raise ValueError(f"{len(runs)} runs of image tokens for {len(image_grid_thw)} images")
        for k, ((start, end), thw) in enumerate(zip(runs, image_grid_thw)):
            t, h, w = (int(v) for v in thw)
            rows, cols = h // merge_size, w // merge_size
            if end - start != t * rows * cols:
                raise ValueError(f"image {k}: {end - start} tokens, grid says {t}x{rows}x{cols}")
            i = np.arange(end - start)
            is_vision[start:end] = True
            image_index[start:end] = k
            grid_row[start:end] = (i % (rows * cols)) // cols
            grid_col[start:end] = i % cols
            width, height = image_sizes[k] if k < len(image_sizes) else (0, 0)
            path = str(image_paths[k]) if k < len(image_paths) else ""
            images.append(ImageSpan(k, start, end, rows, cols, width, height, path))
    cache = {}
    text = []
    for token_id in ids.tolist():
        if token_id not in cache:
            cache[token_id] = token_text(tokenizer, token_id)
        text.append(cache[token_id])
    return TokenMap(ids=ids, text=text, is_vision=is_vision, image_index=image_index, grid_row=grid_row,
                    grid_col=grid_col, images=images)


def _runs(flags: np.ndarray) -> list:
    """[(start, end)] of the runs of True."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
