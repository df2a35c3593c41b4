"""The rules a reader of result files applies, stated once for Python: the figures use them, the tool writes each
unit's short label with them into the metadata, and the viewers (viewer/common.js) apply the same rules in
JavaScript. tests/data/reader_rules.json holds inputs and the outputs both must give; pytest runs it against
these functions and the browser tests against the viewers'.

    show_text    token text as a reader expects it: a line break as a return sign, a carriage return, a tab and
                 the other control characters as their Unicode pictures, spaces at the ends as dots
    short_label  a unit's short label: an image cell by picture, view, row and column; text by its text
    ratio        a metric that is a ratio of two columns (relative L2 = L2 / base norm): 0 / 0 reads 0, x / 0
                 (or a negative denominator) is missing
    spearman     Spearman's rank correlation, ties at their mean rank; missing below 3 pairs or for a constant
                 side
    colour_positions  where each value of one scale (a layer's, with --normalise layer) sits on the colour
                 scale, 0 to 1: from the finite minimum to the maximum, or, for a signed metric, 0.5 at zero and
                 the ends at -m and m (m the largest magnitude); a constant scale reads 0 (signed: 0.5)
"""

import math

import numpy as np

RETURN, CARRIAGE, TAB, EMPTY, SPACE = "\u21b5", "\u240d", "\u21e5", "\u2205", "\u00b7"


def show_text(text) -> str:
    text = str(text).replace("\r\n", "\n").replace("\n", RETURN).replace("\r", CARRIAGE).replace("\t", TAB)
    text = "".join(chr(0x2400 + ord(c)) if ord(c) < 0x20 else "\u2421" if c == "\x7f" else c for c in text)
    if not text:
        return EMPTY
    stripped = text.strip(" ")
    if not stripped:
        return SPACE * len(text)
    lead, trail = len(text) - len(text.lstrip(" ")), len(text) - len(text.rstrip(" "))
    return SPACE * lead + stripped + SPACE * trail


def short_label(unit: dict, view: dict | None = None) -> str:
    """unit: kind, label, token_type, image_index, grid_row, grid_col, grid_rows, grid_cols (a unit of the
    metadata's list); view: the metadata's entry of its image view (its picture, its name, and the video it is a
    frame of, -1 or absent for an image), if any."""
    view = view or {}
    if unit.get("token_type") == "vision" and unit.get("image_index", -1) >= 0:
        picture = view.get("picture", unit["image_index"])
        name = f" {view['name']}" if view.get("name") else ""
        video = view.get("video", -1)
        where = f"vid{video}" if video is not None and video >= 0 else f"img{picture}"
        if unit["kind"] == "image":
            return f"image {picture}"

        def span(a, n):
            return f"{a}-{a + n - 1}" if n > 1 else f"{a}"

        if unit["kind"] == "token" and unit["grid_col"] < 0:  # a row's separator (LLaVA-NeXT's image newline)
            return f"{where}{name} {show_text(unit['label'])} r{unit['grid_row']}"
        if unit["kind"] in ("token", "region"):
            return (f"{where}{name} r{span(unit['grid_row'], unit['grid_rows'])} "
                    f"c{span(unit['grid_col'], unit['grid_cols'])}")
    return show_text(unit["label"])


def head_index(series) -> int | None:
    """h for a series named exactly Head_h (a head of a variant measure), else None ("Head_0 outside" is a
    series of its own, not a head); the viewers test /^Head_\\d+$/."""
    text = str(series)
    return int(text[5:]) if text.startswith("Head_") and text[5:].isdigit() and text[5:].isascii() else None


def ratio(top, bottom) -> np.ndarray:
    top, bottom = np.asarray(top, dtype=np.float64), np.asarray(bottom, dtype=np.float64)
    return np.divide(top, bottom, out=np.where(top == 0, 0.0, np.nan), where=bottom > 0)


def spearman(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties at their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def colour_positions(values, signed: bool) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    out = np.full(values.shape, np.nan)
    if not finite.size:
        return out
    lo, hi = float(finite.min()), float(finite.max())
    known = ~np.isnan(values)
    if signed:
        m = max(abs(lo), abs(hi))
        out[known] = 0.5 + 0.5 * np.sign(values[known]) * np.minimum(1.0, np.abs(values[known]) / m) if m > 0 else 0.5
        return out
    out[known] = np.clip((values[known] - lo) / (hi - lo), 0.0, 1.0) if hi > lo else 0.0
    return out
