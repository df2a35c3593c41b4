"""InternVL (`InternVLForConditionalGeneration`, the transformers-native `-hf` checkpoints): tiles.

The chat template writes `<IMG_CONTEXT>` once per image; the processor replaces it with
`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`. Its image processor (GOT-OCR2's)
cuts the picture into tiles: it picks the grid of C x R tiles (between min_patches and
max_patches tiles) whose shape is closest to the picture's, stretches the picture to C x R tiles
of the tower's input size (448 px) and cuts them row by row; when there is more than one tile it
adds a thumbnail, the whole picture stretched to one tile. Each tile's (448 / 14)^2 = 32 x 32
patches are pixel-shuffled 2 x 2 into 16 x 16 = 256 tokens, row-major (`pixel_shuffle` keeps the
patch grid's row-major order). So an image is one view per tile, then the thumbnail, each a
16 x 16 grid over its part of the picture (the `region` of a tile, the whole picture for the
thumbnail); the views' tokens follow one another in that order. The language model is causal
over every token.
"""

from . import ImageBatch, View, VisionAdapter, register, tile_region
from ..errors import UnsupportedModelError

START, END = "<img>", "</img>"


@register
class InternVL(VisionAdapter):
    model_types = ("internvl",)
    family = "InternVL"
    stop_tokens = ("<|im_end|>",)

    def __init__(self, config, tokenizer, image_processor):
        super().__init__(config, tokenizer, image_processor)
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise UnsupportedModelError("InternVL with vision_feature_select_strategy 'full' is not supported yet")
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        for token in (START, END):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise UnsupportedModelError(f"this InternVL tokenizer has no {token} token")
        vision = config.vision_config
        patches = [size // patch for size, patch in zip(_pair(vision.image_size), _pair(vision.patch_size))]
        self.side = [int(n * config.downsample_ratio) for n in patches]  # (rows, cols) of one tile's tokens

    def image_text(self, views):
        return f"{START}{super().image_text(views)}{END}"

    def builtin_prompt(self, prompt, num_images, system):
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        images = (self.image_token + "\n") * num_images
        return f"{head}<|im_start|>user\n{images}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def process_images(self, images):
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        processor = self.image_processor
        # InternVLProcessor always asks its image processor for tiles (its own default), whatever the
        # image processor's config says: so do we.
        processed = processor(images=images, crop_to_patches=True, return_tensors="pt")
        size = processor.size
        views = []
        for image, count in zip(images, processed["num_patches"].tolist()):
            width, height = image.size
            cols, rows = get_optimal_tiled_canvas((height, width), (size["height"], size["width"]),
                                                  processor.min_patches, processor.max_patches)
            if count == 1:
                views.append([View(*self.side)])
                continue
            if count != rows * cols + 1:
                raise ValueError(f"the image processor made {count} tiles of a {rows} x {cols} cut (expected "
                                 f"{rows * cols} and the thumbnail)")
            tiles = [View(*self.side, region=tile_region(width, height, rows, cols, r, c), name=f"tile {r},{c}",
                          tile=(r, c)) for r in range(rows) for c in range(cols)]
            views.append(tiles + [View(*self.side, name="thumbnail")])
        return ImageBatch(kwargs={"pixel_values": processed["pixel_values"]}, views=views)


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)
