"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, LLaVA-v1.6): any resolution, a base image and tiles.

The chat template writes `<image>` once per image; the processor expands it to the image's
features, all `<image>` tokens, in the order `pack_image_features` lays them out:

1. the base image: the picture stretched to the tower's square input (336 px), its
   (336 / 14)^2 = 24 x 24 patches row-major (the CLS feature dropped);
2. the tiles, as one mosaic: the processor picks the best resolution of `image_grid_pinpoints`
   for the picture, resizes it to fit (keeping its shape) and pads it to that resolution, and cuts
   it into 336-pixel tiles. The model lays the tiles' patch grids side by side into one grid of
   (tile rows x 24) x (tile cols x 24), cuts off the rows or columns of padding (`unpad_image`),
   and ends each row of that grid with the learned `image_newline` vector.

So an image is two views: `base` (24 x 24, the whole picture) and `tiles` (the unpadded mosaic,
its region of the picture, with a separator token, `<image_newline>`, after each row; the
separators are positions of their own, never a cell). The layout comes from the model's own
functions (`get_anyres_image_grid_shape`, `unpad_image`) and the processor's own geometry
(`select_best_resolution`, `get_patch_output_size`). The language model is causal.

The tower (the encoder measures): the base image and each tile one batch entry of the CLIP (SigLIP) tower, as
LLaVA-1.5's. Which tower token lies under each language-model token, the newlines under none, is read by running
the model's own `pack_image_features` on tower-token indices instead of features; a mosaic that the model
resamples (LLaVA-OneVision's anyres_max) has tokens that blend patches, and is refused.
"""

import math

from . import ImageBatch, View, register
from ..errors import UnsupportedModelError
from .llava import Llava

NEWLINE = "<image_newline>"


@register
class LlavaNext(Llava):
    model_types = ("llava_next",)
    family = "LLaVA-NeXT"
    modeling = "transformers.models.llava_next.modeling_llava_next"

    def __init__(self, config, tokenizer, image_processor):
        super().__init__(config, tokenizer, image_processor)
        self.tile = config.vision_config.image_size  # pixels a side of the tower's input (a tile)
        self.side = self.tile // self.patch  # patches a side of one tile
        if not getattr(image_processor, "image_grid_pinpoints", None):
            raise UnsupportedModelError(f"this LLaVA-NeXT checkpoint's image processor ({type(image_processor).__name__})"
                                        " has no image_grid_pinpoints: it cannot make the tiles the model expects")

    def image_feature_kwargs(self) -> dict:
        """What get_image_features takes besides the pixels and image sizes, as the model's forward passes it."""
        return {"vision_feature_layer": self.config.vision_feature_layer,
                "vision_feature_select_strategy": self.config.vision_feature_select_strategy}

    def tower(self, model, model_kwargs, views):
        import torch

        from ..errors import UsageError
        from ..tower import Tower, clip_anatomy

        inner = model.model
        vision = inner.vision_tower
        blocks = getattr(vision, "vision_model", vision).encoder.layers
        pack, seen = inner.pack_image_features, {}

        def packing(image_features, *args, **kwargs):  # what the model packs: each picture's (entries, P, D)
            seen["entries"], seen["args"], seen["kwargs"] = [f.shape[:2] for f in image_features], args, kwargs
            return pack(image_features, *args, **kwargs)

        def run(kw):
            return inner.get_image_features(kw["pixel_values"].to(vision.dtype), kw["image_sizes"],
                                            **self.image_feature_kwargs())

        inner.pack_image_features = packing
        try:
            with torch.no_grad():
                run(model_kwargs)
        finally:
            del inner.pack_image_features  # the class's own method again
        side = self.config.vision_config.image_size // self.patch
        length = side * side + (self.config.vision_config.model_type == "clip_vision_model")  # CLIP's CLS token
        probes, pictures, offset = [], [], 0
        for count, features in seen["entries"]:
            first = length - features  # the CLS token, when the strategy drops it
            index = (offset + torch.arange(count))[:, None] * length + first + torch.arange(features)[None]
            probes.append((index + 1).double()[..., None])  # 0 is left for the newlines
            pictures.append((offset * length, (offset + count) * length))
            offset += count
        kwargs = {**seen["kwargs"], "image_newline": torch.zeros(1, dtype=torch.float64)}
        packed, lengths = pack(probes, *seen["args"], **kwargs)  # (rows, 1), or a list of each picture's
        values = (torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed).reshape(-1) - 1
        if bool((values - values.round()).abs().max() > 1e-6):
            raise UsageError(f"the encoder measures do not reproduce {self.family}'s resampled mosaic (a token blends "
                             "several patches): give a smaller picture, or a checkpoint without anyres_max")
        values = values.round().long()
        cells, at = [], 0
        for n in (lengths.tolist() if hasattr(lengths, "tolist") else lengths):
            cells.append([values[j:j + 1] if values[j] >= 0 else values[j:j] for j in range(at, at + int(n))])
            at += int(n)
        _, measured, note = self.tower_blocks()
        return Tower(module=vision, blocks=blocks, anatomy=clip_anatomy(), num_heads=blocks[0].self_attn.num_heads,
                     cells=cells, pictures=pictures, measured=measured, note=note, run=run)

    def process_images(self, images):
        processed = self.image_processor(images=images, return_tensors="pt")
        views = [[View(self.side, self.side, name="base"), self.mosaic(*image.size)] for image in images]
        return ImageBatch(kwargs={"pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]},
                          views=views)

    def mosaic(self, width: int, height: int) -> View:
        """The tiles' view of a width x height picture: the unpadded grid, its region, a newline per row."""
        import importlib

        import torch
        from transformers.image_processing_utils import select_best_resolution

        modeling = importlib.import_module(self.modeling)  # the family's own layout functions
        tile_rows, tile_cols = modeling.get_anyres_image_grid_shape((height, width), self.config.image_grid_pinpoints,
                                                                    self.tile)
        rows, cols = tile_rows * self.side, tile_cols * self.side
        kept = modeling.unpad_image(torch.empty(1, rows, cols), (height, width)).shape[1:]
        cut_rows, cut_cols = (rows - kept[0]) // 2, (cols - kept[1]) // 2  # removed above / left
        # Where the picture lies on the padded canvas of the best resolution (the processor's own steps).
        best_h, best_w = select_best_resolution((height, width), self.image_processor.image_grid_pinpoints)
        scale_w, scale_h = best_w / width, best_h / height
        if scale_w < scale_h:
            new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
        paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2

        def on_picture(cell_x, cell_y):  # a corner of the kept grid, on the picture (its pixels)
            return ((cell_x * self.patch - paste_x) * width / new_w, (cell_y * self.patch - paste_y) * height / new_h)

        x0, y0 = on_picture(cut_cols, cut_rows)
        x1, y1 = on_picture(cut_cols + kept[1], cut_rows + kept[0])
        region = tuple(round(v, 3) for v in (x0, y0, x1, y1))
        rows, cols = self.shrunk(int(kept[0]), int(kept[1]))
        return View(rows, cols, region=region, name="tiles", separator=NEWLINE,
                    blended=(rows, cols) != (int(kept[0]), int(kept[1])))

    def shrunk(self, rows: int, cols: int) -> tuple:
        """The mosaic's grid after any resampling the model does (none for LLaVA-NeXT)."""
        return rows, cols
