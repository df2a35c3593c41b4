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

The tower (the encoder measures): InternViT, each tile and the thumbnail one batch entry, a CLS token first
(dropped before the pixel shuffle), a block that is pre-norm attention (with optional q/k RMS norms) scaled by
lambda_1, then a norm, the MLP scaled by lambda_2. The language model takes one block's output
(`vision_feature_layer`); the tower tokens under a language-model token are the patches the model's own
`pixel_shuffle` gathers into it (read by running it on patch indices).
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

    def tower_refusal(self):
        from ..tower import feature_layer_refusal

        return feature_layer_refusal(self.config)

    def tower_blocks(self):
        from ..tower import feature_layer_blocks

        return feature_layer_blocks(self.family, self.config)

    def tower(self, model, model_kwargs, views):
        from ..tower import BlockAnatomy, Tower, clip_anatomy, shuffled_cells

        inner, vision = model.model, model.model.vision_tower
        pixels = model_kwargs["pixel_values"]  # (tiles of every picture, 3, H, W): one batch entry per view
        patches = pixels.shape[-1] // _pair(self.config.vision_config.patch_size)[1]  # a side of a tile
        ratio = self.config.downsample_ratio
        under = shuffled_cells(lambda index: inner.pixel_shuffle(index.reshape(1, patches, patches, 1),
                                                                 scale_factor=ratio), patches)  # (tokens, k)
        length = 1 + patches * patches  # the CLS token, then the patches
        cells, pictures, entry = [], [], 0
        for picture in views:
            start = entry * length
            cells.append([tile * length + 1 + cell for tile in range(entry, entry + len(picture)) for cell in under])
            entry += len(picture)
            pictures.append((start, entry * length))
        segments = clip_anatomy().segments  # each tile one batch entry
        anatomy = BlockAnatomy(attention_inputs=_attention_inputs, attention_output=_attention_output,
                               after_attention=_after_attention, segments=segments,
                               scaling=lambda block: block.attention.scale,
                               projection="attention.projection_layer")
        blocks = vision.encoder.layer
        _, measured, note = self.tower_blocks()
        return Tower(module=vision, blocks=blocks, anatomy=anatomy, num_heads=blocks[0].attention.num_heads,
                     cells=cells, pictures=pictures, measured=measured, note=note,
                     run=lambda kw: vision(pixel_values=kw["pixel_values"].to(vision.dtype)))

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


def _attention_inputs(block, x, kwargs):
    """q, k, v (H, S, d) in float32: the norm before attention, the projections, the optional q/k norms."""
    attention, h = block.attention, block.layernorm_before(x)
    split = lambda t: t.reshape(x.shape[0], attention.num_heads, -1).transpose(0, 1).float()  # noqa: E731
    return (split(attention.q_norm(attention.q_proj(h))), split(attention.k_norm(attention.k_proj(h))),
            split(attention.v_proj(h)))


def _attention_output(block, o):
    """The attention module's output (before lambda_1): its projection of the heads."""
    return block.attention.projection_layer(o.to(block.attention.projection_layer.weight.dtype))


def _after_attention(block, x, attended):
    hidden = x + block.lambda_1 * attended.to(x.dtype)
    return hidden + block.lambda_2 * block.mlp(block.layernorm_after(hidden))


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)
