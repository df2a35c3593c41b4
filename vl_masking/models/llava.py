"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a fixed grid of patches per image.

The chat template writes `<image>` once per image; the processor expands it to one token per
vision-tower patch that the language model receives: (crop height / patch) x (crop width /
patch), 24 x 24 = 576 for the 336-pixel CLIP of llava-1.5, the CLS feature dropped
(`vision_feature_select_strategy="default"`). Token i sits at row i // cols, column i % cols of
that grid, row-major as the tower's patch sequence.

The CLIP processor sees less (or more) than the picture: it resizes the shortest edge to the
crop size and cuts the centre square (a wide photo loses its sides), or with `do_pad` first pads
the picture to a square. `seen_region` gives the part of the picture, in its own pixels, that the
grid covers; it travels in the metadata so that figures and viewers draw that part under the
grid, never the whole picture stretched. The language model is causal over every token.

The tower (the encoder measure): a CLIP (or SigLIP) ViT, each picture one batch entry, CLIP's CLS
token first, one tower token under each language-model token. The language model takes the
features of one block (`vision_feature_layer`, -2: the second-to-last block's output): the blocks
after it never reach it, and are not measured.
"""

import torch

from . import ImageBatch, View, VisionAdapter, register
from ..errors import UnsupportedModelError

CLIP_TOWERS = ("clip_vision_model", "siglip_vision_model")


@register
class Llava(VisionAdapter):
    model_types = ("llava",)
    family = "LLaVA"
    strategies = ("default",)  # 'full' keeps CLIP's CLS feature before the patches: no cell of the grid

    def __init__(self, config, tokenizer, image_processor):
        super().__init__(config, tokenizer, image_processor)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy not in self.strategies:
            raise UnsupportedModelError(f"{self.family} with vision_feature_select_strategy '{strategy}' is not "
                                        "supported yet")
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.patch = config.vision_config.patch_size

    def builtin_prompt(self, prompt, num_images, system):
        head = f"{system} " if system else ""
        return f"{head}USER: {self.image_token * num_images}\n{prompt} ASSISTANT:"

    def tower_refusal(self):
        from ..tower import feature_layer_refusal

        kind = self.config.vision_config.model_type
        if kind not in CLIP_TOWERS:
            return f"the encoder measure does not reproduce a {kind} vision tower"
        return feature_layer_refusal(self.config)

    def tower_blocks(self):
        from ..tower import feature_layer_blocks

        return feature_layer_blocks(self.family, self.config)

    def tower(self, model, model_kwargs, views):
        from ..tower import Tower, clip_anatomy

        vision = model.model.vision_tower
        pixels = model_kwargs["pixel_values"]
        rows, cols = pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch
        first = 1 if self.config.vision_config.model_type == "clip_vision_model" else 0  # CLIP's CLS token
        length = first + rows * cols
        cells = [[torch.tensor([i * length + first + j]) for j in range(rows * cols)] for i in range(len(pixels))]
        pictures = [(i * length, (i + 1) * length) for i in range(len(pixels))]
        blocks = getattr(vision, "vision_model", vision).encoder.layers  # the tower's module tree differs by version
        _, measured, note = self.tower_blocks()
        return Tower(module=vision, blocks=blocks, anatomy=clip_anatomy(),
                     num_heads=blocks[0].self_attn.num_heads, cells=cells, pictures=pictures, measured=measured,
                     note=note, run=lambda kw: vision(kw["pixel_values"].to(vision.dtype)))

    def process_images(self, images):
        processed = self.image_processor(images=images, return_tensors="pt")
        pixels = processed["pixel_values"]
        rows, cols = pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch
        regions = [seen_region(self.image_processor, *im.size) for im in images]
        return ImageBatch(kwargs={"pixel_values": pixels}, views=[[View(rows, cols, region)] for region in regions])


def seen_region(processor, width: int, height: int) -> tuple:
    """(x0, y0, x1, y1) of the picture, in its own pixels, that the processed square covers (outside the
    picture where it was padded). Follows the processor's own steps: pad to a square, resize, centre crop."""
    x0, y0, w, h = 0.0, 0.0, float(width), float(height)
    if getattr(processor, "do_pad", False):  # pad to a square around the picture
        side = max(w, h)
        x0, y0, w, h = (w - side) / 2, (h - side) / 2, side, side
    size = getattr(processor, "size", None) or {}
    if "shortest_edge" in size:
        scale_x = scale_y = size["shortest_edge"] / min(w, h)
    else:  # an exact height x width: stretched
        scale_x, scale_y = size.get("width", w) / w, size.get("height", h) / h
    resized_w, resized_h = w * scale_x, h * scale_y
    if getattr(processor, "do_center_crop", False):
        crop = processor.crop_size
        cut_x, cut_y = (resized_w - crop["width"]) / 2, (resized_h - crop["height"]) / 2
        x0, y0 = x0 + cut_x / scale_x, y0 + cut_y / scale_y
        w, h = crop["width"] / scale_x, crop["height"] / scale_y
    return (round(x0, 3), round(y0, 3), round(x0 + w, 3), round(y0 + h, 3))
