"""The token map: for every position, its text, type, image index and grid cell, and its role in the prompt.

The runs of the family's image token hold the pictures' views, in order (one view for most
families; a tile each and a thumbnail where a family cuts the picture into tiles), a run holding
one view or several, and each view is one grid, row-major: token i of a view of
c columns sits at row i // c, column i % c. Views are numbered across the prompt: a token's
`image_index` is its view, and each view records the picture it belongs to. The views always come
from the family's adapter (for Qwen-VL image_grid_thw), never from a square root.

Besides types and cells, the map knows which prompt tokens are template markup (special
tokens and the chat roles' headers), which belong to the user's question, and each prompt
token's character range in the rendered prompt: the flow groups `text` and `question` and
the `text:"..."` spans are read from these.
"""

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageSpan:
    """One view of a picture: its tokens, its grid and the part of the picture it covers."""

    index: int  # the view's number in the prompt (a token's image_index)
    start: int  # first vision-token position
    end: int  # one past the last
    grid_rows: int
    grid_cols: int
    width: int = 0  # picture size in pixels, as seen (after its EXIF orientation)
    height: int = 0
    path: str = ""
    region: tuple | None = None  # (x0, y0, x1, y1) of the picture the grid covers, when not all of it
    picture: int = 0  # which --image it shows
    name: str = ""  # "tile 0,1", "thumbnail"; "" for a picture that is one view
    separators: bool = False  # a separator token ends each row (no cell: grid_col -1)
    blended: bool = False  # resampled by the model: a cell blends the patches it replaced (no patch is under one)
    video: int = -1  # which --video the view is a temporal patch of; -1 for an image
    time: float | None = None  # a video view's time in seconds
    frames: tuple = ()  # a video view's frames (indices into the source)
    trailer: str = ""  # a token after the last row that is no cell (its last position), "" for none

    def to_dict(self) -> dict:
        out = {"index": self.index, "path": self.path, "token_start": self.start, "token_end": self.end,
               "grid_rows": self.grid_rows, "grid_cols": self.grid_cols,
               "width": self.width, "height": self.height}
        if self.region is not None:
            out["region"] = list(self.region)
        if self.name:  # a picture of several views
            out["picture"], out["view"] = self.picture, self.name
        if self.separators:
            out["row_separators"] = True
        if self.blended:
            out["resampled"] = True
        if self.video >= 0:
            out.update(video=self.video, time=self.time, frames=list(self.frames))
        if self.trailer:
            out["trailer"] = self.trailer
        return out

    @property
    def label(self) -> str:
        if self.video >= 0:
            return f"video {self.video} {self.name}"
        return f"image {self.picture}" + (f" {self.name}" if self.name else "")

    def position(self, row: int, col: int) -> int:
        """The sequence position of cell (row, col)."""
        return self.start + row * (self.grid_cols + self.separators) + col


@dataclass
class PromptLayout:
    """Where the prompt's parts lie in its rendered text (character offsets)."""

    text: str = ""
    offsets: list = field(default_factory=list)  # (start, end) per prompt token
    question: tuple = (0, 0)  # the user's prompt text
    system: tuple | None = None  # the --system text, when given


@dataclass
class TokenMap:
    """Per-position arrays over a sequence (the prompt, or prompt plus generated tokens)."""

    ids: np.ndarray
    text: list
    is_vision: np.ndarray  # bool
    image_index: np.ndarray  # int32, the view of each vision token; -1 for text
    grid_row: np.ndarray
    grid_col: np.ndarray
    images: list
    prompt_length: int = 0
    is_special: np.ndarray = None  # bool: special tokens (<|im_start|>, <|image_pad|>, ...)
    in_question: np.ndarray = None  # bool: tokens of the user's prompt text
    in_text: np.ndarray = None  # bool: tokens of the prompt's own text, the user's and the system's (not the
    #                             template's markup, in any family's format: where the layout put the texts)
    layout: PromptLayout = field(default_factory=PromptLayout)

    @property
    def pictures(self) -> list:
        """[(start, end)] of each picture's tokens (all its views), in --image order."""
        ranges = {}
        for view in self.images:
            start, end = ranges.get(view.picture, (view.start, view.end))
            ranges[view.picture] = (min(start, view.start), max(end, view.end))
        return [ranges[k] for k in sorted(ranges)]

    @property
    def view_positions(self) -> list:
        """Every position of the pictures' views, in order: the image (and video) tokens, without the text between
        a picture's views (Qwen3-VL's timestamps, Idefics3's tile markers)."""
        return sorted(p for view in self.images for p in range(view.start, view.end))

    @property
    def picture_index(self) -> np.ndarray:
        """(S,) the picture of each vision token, -1 for text: the blocks of bidirectional image attention."""
        out = np.full(len(self.ids), -1, dtype=np.int64)
        for view in self.images:
            out[view.start:view.end] = view.picture
        return out

    def find_text(self, needle: str) -> list:
        """Positions of every occurrence of `needle` in the question (and system) text, one tuple each."""
        layout = self.layout
        regions = [layout.question] + ([layout.system] if layout.system else [])
        found = []
        for start, end in regions:
            at = layout.text.find(needle, start, end)
            while at >= 0 and at + len(needle) <= end:
                lo, hi = at, at + len(needle)
                positions = tuple(p for p, (a, b) in enumerate(layout.offsets)
                                  if a < hi and b > lo and not self.is_vision[p])
                if positions:
                    found.append(positions)
                at = layout.text.find(needle, at + 1, end)
        return sorted(set(found))


def token_text(tokenizer, token_id: int) -> str:
    """What a reader expects to see: ' the' rather than 'Ġthe'; special tokens keep their names."""
    return tokenizer.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def special_token_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def build_token_map(tokenizer, ids, vision_token_ids=(), views=(), image_sizes=(), image_paths=(),
                    prompt_length=None, layout=None) -> TokenMap:
    """Per-position arrays; the runs of the vision tokens (the image token, and the video token where the family
    has one) hold the pictures' views in order (models.View: rows, cols, region, name), each laid on its grid
    row-major. Pictures are the images, then the videos."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    prompt_length = n if prompt_length is None else prompt_length
    is_vision = np.zeros(n, dtype=bool)
    image_index = np.full(n, -1, dtype=np.int32)
    grid_row = np.full(n, -1, dtype=np.int32)
    grid_col = np.full(n, -1, dtype=np.int32)
    images, separators = [], {}  # position -> what the separator token there is called
    if len(views):
        # Each view lies in one run of image tokens; a run holds one view or several (a family whose
        # views are split by marker tokens has a run per view).
        runs = iter(_runs(np.isin(ids[:prompt_length], list(vision_token_ids))))
        at = stop_of_run = 0
        videos = 0
        for k, picture_views in enumerate(views):
            video = videos if any(view.video for view in picture_views) else -1
            videos += video >= 0
            width, height = image_sizes[k] if k < len(image_sizes) else (0, 0)
            path = str(image_paths[k]) if k < len(image_paths) else ""
            for view in picture_views:
                if at == stop_of_run:
                    at, stop_of_run = next(runs, (None, None))
                    if at is None:
                        raise ValueError(f"image {k}: its views need more image tokens than the prompt has")
                i = np.arange(view.tokens - bool(view.trailer))
                stop, width_in_tokens = at + view.tokens, view.cols + bool(view.separator)
                if stop > stop_of_run:
                    raise ValueError(f"image {k} {view.name or ''}: {view.tokens} tokens, the run of image tokens "
                                     f"at {at} holds {stop_of_run - at}")
                is_vision[at:stop] = True
                image_index[at:stop] = len(images)
                grid_row[at:at + len(i)] = i // width_in_tokens
                grid_col[at:at + len(i)] = np.where(i % width_in_tokens < view.cols, i % width_in_tokens, -1)
                for p in np.flatnonzero(grid_col[at:at + len(i)] < 0) + at:
                    separators[int(p)] = view.separator
                if view.trailer:  # after the last row, as a row's separator would be
                    grid_row[stop - 1], grid_col[stop - 1] = view.rows - 1, -1
                    separators[stop - 1] = view.trailer
                region = tuple(view.region) if view.region is not None else None
                images.append(ImageSpan(len(images), at, stop, view.rows, view.cols, width, height, path, region,
                                        picture=k, name=view.name, separators=bool(view.separator),
                                        blended=view.blended, video=video, time=view.time, frames=view.frames,
                                        trailer=view.trailer))
                at = stop
            if at != stop_of_run:
                raise ValueError(f"image {k}: its views end at {at}, inside a run of image tokens")
        if next(runs, None) is not None:
            raise ValueError(f"more runs of image tokens than the {len(views)} images need")
    cache = {}
    text = []
    for token_id in ids.tolist():
        if token_id not in cache:
            cache[token_id] = token_text(tokenizer, token_id)
        text.append(cache[token_id])
    for p, name in separators.items():  # the image token's text there would hide what the position holds
        text[p] = name
    specials = special_token_ids(tokenizer)
    is_special = np.array([i in specials for i in ids.tolist()], dtype=bool)
    layout = layout or PromptLayout(offsets=[])
    return TokenMap(ids=ids, text=text, is_vision=is_vision, image_index=image_index, grid_row=grid_row,
                    grid_col=grid_col, images=images, prompt_length=prompt_length, is_special=is_special,
                    in_question=_inside(layout.offsets, layout.question, n) & ~is_special & ~is_vision,
                    in_text=(_inside(layout.offsets, layout.question, n) | _inside(layout.offsets, layout.system, n))
                    & ~is_special & ~is_vision,
                    layout=layout)


def _inside(offsets: list, span: tuple | None, n: int) -> np.ndarray:
    flags = np.zeros(n, dtype=bool)
    if span is None:
        return flags
    lo, hi = span
    for p, (a, b) in enumerate(offsets[:n]):
        flags[p] = a < hi and b > lo
    return flags


def _runs(flags: np.ndarray) -> list:
    """[(start, end)] of the runs of True."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
