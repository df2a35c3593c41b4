"""Drawing (matplotlib, headless): the layer x unit heatmap, the image under its heat for every layer, one layer's
heads, the curves of every series, the curves averaged over prompts with their intervals, the scatter of two
measures; every figure carries its caption line.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UsageError
from ..reader_rules import colour_positions, head_index, show_text, spearman
from .reading import Result, default_series, pick, unit_label, unit_values
from .averages import BOOTSTRAP, interval_words, series_groups

DPI = 100


def caption(result: Result, step: int, series: str, metric: str, normalise: str, what: str | None = None) -> str:
    meta = result.meta
    prompt = " ".join(str(meta.get("prompt", "")).split())
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    what = what or result.schema["series"]["label"]
    return (f"{meta.get('model', '?')} | \"{prompt}\" | step {step} | {what} {series} | "
            f"{result.metric(metric)['label']} | {normalise}")


def set_title(fig, text: str, fontsize: float = 8) -> None:
    """The caption line, wrapped to the figure's width (a narrow figure never cuts it off)."""
    import textwrap

    per_line = max(20, int(fig.get_figwidth() * 72 / (fontsize * 0.6)))  # a character is about 0.6 em wide
    fig.suptitle("\n".join(textwrap.wrap(text, per_line, break_long_words=True)), fontsize=fontsize)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _norm(values: np.ndarray, signed: bool, mode: str):
    from matplotlib import colors

    finite = values[np.isfinite(values)]
    if not finite.size:
        return colors.Normalize(0, 1)
    lo, hi = float(finite.min()), float(finite.max())
    if signed:
        m = max(abs(lo), abs(hi)) or 1.0
        return colors.TwoSlopeNorm(0.0, -m, m) if mode == "linear" else colors.SymLogNorm(m / 100, vmin=-m, vmax=m)
    if hi <= lo:
        hi = lo + 1e-12
    return colors.PowerNorm(0.5, lo, hi) if mode == "sqrt" else colors.Normalize(lo, hi)


def _cmap(signed: bool):
    return "RdBu_r" if signed else "viridis"


# -- (2) the layer x unit heatmap ---------------------------------------------------------------

def heatmap(result: Result, step: int, series: str, metric: str, normalise: str = "global", scaling: str = "linear"):
    """Rows = layers (window centres), columns = units; returns (figure, the drawn matrix, its axes)."""
    plt = _pyplot()
    rows = pick(result, step, series, metric)
    units = rows.drop_duplicates(["unit_kind", "unit_positions"]).sort_values("token_position", kind="stable")
    key = units.unit_kind.astype(str) + "|" + units.unit_positions.astype(str)
    order = {k: i for i, k in enumerate(key)}
    layers = sorted(rows.layer.unique())
    matrix = np.full((len(layers), len(units)), np.nan)
    at = (rows.unit_kind.astype(str) + "|" + rows.unit_positions.astype(str)).map(order).to_numpy()
    matrix[np.searchsorted(layers, rows.layer.to_numpy()), at] = rows.value.to_numpy()
    signed = result.metric(metric)["signed"]
    shown = matrix.copy()
    if normalise == "layer" and not signed:  # each row from its own minimum to its maximum
        shown = np.stack([colour_positions(row, signed=False) for row in shown]) if len(shown) else shown
    width = min(24, max(6, 0.22 * len(units) + 2))
    height = min(14, max(3, 0.3 * len(layers) + 2.2))
    fig, ax = plt.subplots(figsize=(width, height), dpi=DPI, constrained_layout=True)
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=_cmap(signed),
                      norm=_norm(shown, signed, scaling))
    labels = [unit_label(r, result) for r in units.itertuples()]
    ax.set_xticks(range(len(units)), labels, rotation=90, fontsize=7, fontfamily="monospace")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_ylabel(result.rows_label)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label(result.metric(metric)["label"] + (" (each layer min..max)" if normalise == "layer" and not signed
                                                    else ""))
    set_title(fig, caption(result, step, series, metric, _normalise_text(normalise)))
    return fig, matrix, ax


def _normalise_text(normalise: str) -> str:
    return {"layer": "normalised per layer", "step": "one scale for this step", "global": "one scale for the figure"}[
        normalise]


# -- (1) the image under its heat, every layer --------------------------------------------------

def image_grid(rows: pd.DataFrame, image: dict, layer: int) -> np.ndarray:
    """(grid rows, grid cols) values of one layer's units over one image's merged token grid."""
    grid = np.full((image["grid_rows"], image["grid_cols"]), np.nan)
    vision = rows.token_type.astype(str) == "vision"
    mine = rows[(rows.layer == layer) & (rows.image_index == image["index"]) & vision]
    spans = mine[mine.unit_kind.astype(str).isin(["span", "group"])]
    regular = mine[~mine.index.isin(spans.index)]
    for r in regular.itertuples():
        grid[r.grid_row: r.grid_row + max(1, r.grid_rows), r.grid_col: r.grid_col + max(1, r.grid_cols)] = r.value
    return grid


def mapped_view(images: list) -> dict:
    """The grid the image maps draw: the first picture's, or where it was cut into tiles, its thumbnail
    (the view that covers all of it)."""
    first = [v for v in images if v.get("picture", v["index"]) == images[0].get("picture", images[0]["index"])]
    whole = [v for v in first if not v.get("region")]
    return whole[0] if len(first) > 1 and whole else images[0]


def load_picture(result: Result, image_path, image: dict | None = None):
    """The picture under a view's grid (the first image's by default), from --image or the metadata's path: as
    the tool saw it (EXIF orientation applied), and only the part the grid covers where the processor cut it
    (the region: a crop, or a tile); a video's view: the first frame under it."""
    from ..pictures import open_image

    image = image or (result.meta.get("images") or [{}])[0]
    if image.get("video", -1) >= 0 and not image_path:  # a video's view: its first frame, read from the video
        return filmstrip(result, [image.get("index")])
    path = image_path or image.get("path")
    if not path or not Path(path).is_file():
        return None
    picture = open_image(str(path))
    region = image.get("region")
    if region:
        scale_x, scale_y = picture.width / (image.get("width") or picture.width), picture.height / (
            image.get("height") or picture.height)
        box = tuple(int(round(v * s)) for v, s in zip(region, (scale_x, scale_y, scale_x, scale_y)))
        picture = picture.crop(box)  # outside the picture (padding): black, as Pillow fills it
    return np.asarray(picture)


def covered_aspect(image: dict) -> float:
    """Height over width of what the grid covers: its region, else the picture, else the grid."""
    region = image.get("region")
    if region:
        return (region[3] - region[1]) / (region[2] - region[0])
    return (image.get("height") or image["grid_rows"]) / (image.get("width") or image["grid_cols"])


PICTURE_MODES = ("outline", "grey", "colour")


def underlay(picture: np.ndarray | None, mode: str) -> tuple:
    """(what is drawn under the heat, the heat's opacity, what is drawn over it) for one --picture mode.

    outline (the default): the heat opaque, so every cell has exactly its colour-bar colour, and the
    picture's edges drawn over it in black; grey: the picture in light greys under a 60 % heat, so
    that no hue of the picture mixes with the palette (a pink animal under a blue scale reads as
    neither); colour: the picture as it is under a 60 % heat.
    """
    if picture is None:
        return None, 1.0, None
    if mode == "colour":
        return dict(X=picture), 0.6, None
    rgb = picture[..., :3].astype(float) if picture.ndim == 3 else np.repeat(picture[..., None], 3, -1).astype(float)
    luminance = (rgb @ np.array([0.299, 0.587, 0.114])) / 255.0  # ITU-R 601, as Pillow's "L"
    if mode == "grey":
        return dict(X=0.45 + 0.55 * luminance, cmap="gray", vmin=0, vmax=1), 0.6, None
    dy, dx = np.gradient(luminance)
    edges = np.hypot(dx, dy)
    strong = edges > max(0.04, np.quantile(edges, 0.9))  # the sharpest tenth, never flat noise
    over = np.zeros(edges.shape + (4,))
    over[..., 3] = np.where(strong, 0.85, 0.0)  # black where the picture has an edge, clear elsewhere
    return None, 1.0, dict(X=over)


def small_multiples(result: Result, image: dict, panels: list, signed: bool, scaling: str, image_path, columns: int,
                    inches: float, label: str, title: str, picture_mode: str = PICTURE_MODES[0], marks=(),
                    views: list | None = None):
    """One image's grids as small multiples (the picture under each), one shared colour bar. panels: [(title, grid)];
    marks: (row, col) cells outlined on every panel (--mark: where the evidence is); views: each panel's own view
    (a video's frames, one grid size), its picture under it, instead of `image`'s."""
    plt = _pyplot()
    norm = _norm(np.concatenate([grid.ravel() for _, grid in panels]), signed, scaling)
    unders = [underlay(load_picture(result, image_path, view), picture_mode) for view in views or [image]]
    columns = min(columns, len(panels))
    lines = math.ceil(len(panels) / columns)
    aspect = covered_aspect(image)
    fig, axes = plt.subplots(lines, columns, figsize=(inches * columns + 1.2, inches * aspect * lines + 0.9), dpi=DPI,
                             squeeze=False, constrained_layout=True)
    extent = (0, image["grid_cols"], image["grid_rows"], 0)
    # a cell's height over its width on the picture: 1 for Qwen-VL's square patches, not for a grid that a
    # processor stretched over the picture (Gemma 3's 16 x 16 on any shape): the picture keeps its shape
    cell = aspect * image["grid_cols"] / image["grid_rows"]
    for k, (ax, (name, grid)) in enumerate(zip(axes.ravel(), panels)):
        under, alpha, over = unders[k if views else 0]
        if under is not None:
            ax.imshow(**under, extent=extent, interpolation="bilinear", aspect=cell)
        drawn = ax.imshow(grid, extent=extent, cmap=_cmap(signed), norm=norm, alpha=alpha, interpolation="nearest",
                          aspect=cell)
        if over is not None:
            ax.imshow(**over, extent=extent, interpolation="nearest", aspect=cell)
        for row, col in marks:
            ax.add_patch(plt.Rectangle((col, row), 1, 1, fill=False, edgecolor="#00c853", linewidth=2.5))
        ax.set_title(name, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.colorbar(drawn, ax=axes, shrink=0.8, label=label)
    set_title(fig, title)
    return fig


def layer_multiples(result: Result, step: int, series: str, metric: str, image_path=None, layers=None,
                    scaling: str = "linear", picture_mode: str = PICTURE_MODES[0], marks=()):
    """Every layer's map of the first image (the picture under it), small multiples with one colour bar."""
    images = result.meta.get("images") or []
    if not images:
        raise UsageError(f"{result.path}: the run has no image (a text-only prompt): no image maps to draw")
    rows = pick(result, step, series, metric)
    rows = rows[rows.unit_kind.astype(str) != "group"]
    layers = [x for x in sorted(rows.layer.unique()) if layers is None or x in layers]
    name = result.schema["rows"]["short"]
    view = mapped_view(images)
    panels = [(f"{name} {layer}", image_grid(rows, view, layer)) for layer in layers]
    spec = result.metric(metric)
    return small_multiples(result, view, panels, spec["signed"], scaling, image_path, 6, 2.2, spec["label"],
                           caption(result, step, series, metric, "one scale for every layer"), picture_mode, marks)


def frame_maps(result: Result, step: int, series: str, metric: str, layer: int, scaling: str = "linear",
               picture_mode: str = PICTURE_MODES[0]):
    """One layer's map of every frame of the first video (each temporal patch's units over its own first frame),
    small multiples with one colour bar; None where no unit is smaller than a frame."""
    frames = [v for v in result.meta.get("images") or [] if v.get("video", -1) == 0]
    rows = pick(result, step, series, metric)
    rows = rows[~rows.unit_kind.astype(str).isin(["group", "frame", "video", "image"])]
    if not frames or not rows.image_index.isin([v["index"] for v in frames]).any():
        return None
    panels = [(f"{v.get('view', 'frame')}" + (f" ({v['time']:.1f} s)" if v.get("time") is not None else ""),
               image_grid(rows, v, layer)) for v in frames]
    spec = result.metric(metric)
    return small_multiples(result, frames[0], panels, spec["signed"], scaling, None, 6, 2.2, spec["label"],
                           caption(result, step, series, metric, f"{result.schema['rows']['short']} {layer}, every "
                                   "frame, one scale"), picture_mode, views=frames)


# -- (4) one layer's heads ---------------------------------------------------------------------

def heads(result: Result, step: int, layer: int, metric: str, image_path=None, scaling: str = "linear",
          picture_mode: str = PICTURE_MODES[0]):
    images = result.meta.get("images") or []
    variants = sorted({str(v) for v in result.table.variant.unique() if head_index(v) is not None}, key=head_index)
    if not images or not variants:
        raise UsageError(f"{result.path}: the heads figure needs an image and Head_h variants")
    view = mapped_view(images)
    panels = [(v.replace("_", " "), image_grid(pick(result, step, v, metric), view, layer)) for v in variants]
    return small_multiples(result, view, panels, result.metric(metric)["signed"], scaling, image_path, 8, 1.8,
                           result.metric(metric)["label"], caption(result, step, f"heads of layer {layer}", metric, "one scale for every head"),
                           picture_mode)


# -- (3) curves of every series (flow files: every flow) ------------------------------------------


def series_curves(result: Result, step: int, metric: str):
    plt = _pyplot()
    groups = series_groups(result, step, metric)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=DPI, constrained_layout=True)
    for name, rows in groups.groupby("group", sort=False):
        ax.plot(rows.layer, rows.value, marker="o", markersize=3, label=name)
    spec = result.metric(metric)
    if spec["signed"]:
        ax.axhline(0, color="#888", linewidth=0.8)
    ax.set_xlabel(result.rows_label)
    ax.set_ylabel(spec["label"])
    _integer_layers(ax)
    ax.legend(fontsize=8)
    settings = ", ".join(f"{k} {result.meta[k]}" for k in result.schema.get("options", ()) if
                         isinstance(result.meta.get(k), (int, float, str)))
    set_title(fig, caption(result, step, settings, metric, "values as measured",
                           what=f"every {result.schema['series']['label']},"))
    return fig


def frame_layers(result: Result, step: int, series: str, metric: str, scaling: str = "linear"):
    """A video's frames (units of kind frame: --mask-unit frame, or a frames->... flow) against every layer: the
    frame x layer heatmap beside one curve per frame; None when the series has no frame units."""
    rows = pick(result, step, series, metric)
    rows = rows[rows.unit_kind.astype(str) == "frame"]
    if rows.empty:
        return None
    plt = _pyplot()
    frames = rows.drop_duplicates("unit_positions").sort_values("token_position", kind="stable")
    order = {key: i for i, key in enumerate(frames.unit_positions.astype(str))}
    layers = sorted(rows.layer.unique())
    matrix = np.full((len(layers), len(frames)), np.nan)
    matrix[np.searchsorted(layers, rows.layer.to_numpy()), rows.unit_positions.astype(str).map(order).to_numpy()] = \
        rows.value.to_numpy()
    signed = result.metric(metric)["signed"]
    labels = [unit_label(r, result) for r in frames.itertuples()]
    strip = filmstrip(result, frames.image_index.astype(int).tolist())
    fig = plt.figure(figsize=(min(22, 7 + 0.5 * len(frames)), 4.8 + (1.4 if strip is not None else 0)), dpi=DPI,
                     constrained_layout=True)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.2, 1], height_ratios=[1, 3.2] if strip is not None else [0.001, 1])
    left, right = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[:, 1])
    if strip is not None:  # each temporal patch's first frame over its column
        top = fig.add_subplot(grid[0, 0], sharex=left)
        top.imshow(strip, extent=(-0.5, len(frames) - 0.5, 0, 1), aspect="auto", interpolation="bilinear")
        top.set_yticks([])
        top.tick_params(labelbottom=False)
    image = left.imshow(matrix, aspect="auto", interpolation="nearest", cmap=_cmap(signed),
                        norm=_norm(matrix, signed, scaling), origin="lower")
    left.set_xticks(range(len(frames)), labels, rotation=60, ha="right", fontsize=7)
    left.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    left.set_ylabel(result.rows_label)
    fig.colorbar(image, ax=left, shrink=0.8).set_label(result.metric(metric)["label"])
    colours = plt.get_cmap("plasma")(np.linspace(0.05, 0.85, len(frames)))  # early frames dark, late bright
    for k, (label, colour) in enumerate(zip(labels, colours)):
        right.plot(layers, matrix[:, k], marker="o", markersize=3, color=colour, label=label)
    if signed:
        right.axhline(0, color="#888", linewidth=0.8)
    right.set_xlabel(result.rows_label)
    right.set_ylabel(result.metric(metric)["label"])
    _integer_layers(right)
    right.legend(fontsize=6, ncol=1 + len(frames) // 12)
    set_title(fig, caption(result, step, series, metric, "values as measured", what="frames x layers,"))
    return fig


def filmstrip(result: Result, views: list):
    """The first source frame of each view (a temporal patch) side by side, (H, n * W, 3) uint8, read again from
    the video the metadata names; None when it is not where the run found it."""
    from ..errors import UsageError as Unreadable
    from ..video import probe, read_frames

    images = {v.get("index"): v for v in result.meta.get("images") or []}
    clips = result.meta.get("videos") or []
    frames = []
    for index in views:
        view = images.get(index, {})
        video = view.get("video", -1)
        if not (0 <= video < len(clips)) or not view.get("frames") or not Path(clips[video]["path"]).exists():
            return None
        try:
            frames.append(read_frames(probe(clips[video]["path"]), [view["frames"][0]])[0])
        except Unreadable:
            return None
    if len({f.shape for f in frames}) != 1:
        return None
    return np.concatenate(frames, axis=1)


def _integer_layers(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def aggregate_curves(summary: pd.DataFrame, spec: dict, title: str, x_label: str = "layer", over: str = "prompts",
                     by: str | None = None):
    """The mean curves with their intervals; with `by` (a column of the summary) one panel per value of it."""
    plt = _pyplot()
    panels = [(None, summary)] if by is None else list(summary.groupby(by, sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, 4.2 * len(panels)), 4.5), dpi=DPI, sharey=True,
                             constrained_layout=True, squeeze=False)
    for ax, (value, rows) in zip(axes[0], panels):
        for group, part in rows.groupby("group", sort=False):
            line, = ax.plot(part.layer, part["mean"], marker="o", markersize=3, label=f"{group} (n={part.n.max()})")
            ax.fill_between(part.layer, part.low, part.high, color=line.get_color(), alpha=0.2, linewidth=0)
        if spec["signed"]:
            ax.axhline(0, color="#888", linewidth=0.8)
        if value is not None:
            ax.set_title(f"{by} = {show_text(str(value))}", fontsize=9)
        ax.set_xlabel(x_label)
        _integer_layers(ax)
        ax.legend(fontsize=7)
    band = interval_words(summary.n)
    axes[0][0].set_ylabel(f"{spec['label']}: mean over {over},\n{band}"
                          + (f" ({BOOTSTRAP} resamples)" if summary.n.max() >= 2 else ""))
    set_title(fig, title)
    return fig


def scatter(a: Result, b: Result, step: int, layer: int, metrics=(None, None), series=(None, None)):
    """Per unit, one file's default metric against another's, at one layer of one run (say knockout impact
    against attention weight); returns (figure, Spearman's rho, number of units)."""
    plt = _pyplot()
    picked = []
    for result, metric, chosen in ((a, metrics[0], series[0]), (b, metrics[1], series[1])):
        metric = metric if metric in result.metrics else result.schema["metrics"][0]["key"]
        chosen = chosen or default_series(result)
        picked.append((result, metric, chosen, unit_values(result, step, layer, chosen, metric)))
    x, y = picked[0][3], picked[1][3]
    common = x.index.intersection(y.index)
    if not len(common):
        raise UsageError(f"{a.path} and {b.path} share no units at layer {layer}")
    xs, ys = x.value[common].to_numpy(np.float64), y.value[common].to_numpy(np.float64)
    rho = spearman(xs, ys)
    vision = x.vision[common].to_numpy(bool)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=DPI, constrained_layout=True)
    for mask, colour, label in ((vision, "#2166ac", "image units"), (~vision, "#d6604d", "text units")):
        if mask.any():
            ax.scatter(xs[mask], ys[mask], s=14, color=colour, label=f"{label} ({int(mask.sum())})")
    (ra, ma, sa, _), (rb, mb, sb, _) = picked
    ax.set_xlabel(f"{ra.measure}: {ra.metric(ma)['label']} ({sa})")
    ax.set_ylabel(f"{rb.measure}: {rb.metric(mb)['label']} ({sb})")
    ax.legend(fontsize=8)
    set_title(fig, f"{a.meta.get('model', '?')} | step {step} | layer {layer} | {len(common)} units | "
                   f"Spearman rho {rho:.3f}")
    return fig, rho, len(common)


def check_picture(result: Result, image_path) -> None:
    """The picture drawn under the grid must have the shape of the one the run saw (never stretched)."""
    image = result.meta["images"][0]
    if not image_path or not image.get("width") or not image.get("height"):
        return
    from ..pictures import open_image

    try:
        width, height = open_image(str(image_path)).size
    except Exception as exc:  # noqa: BLE001 - any unreadable picture is one line
        raise UsageError(f"--image {image_path}: not a readable image ({type(exc).__name__})") from None
    if abs(width / height - image["width"] / image["height"]) > 0.02 * image["width"] / image["height"]:
        raise UsageError(f"--image {image_path} is {width}x{height} px, but image 0 of {result.path} was "
                         f"{image['width']}x{image['height']} px: another shape would be stretched over the grid")
