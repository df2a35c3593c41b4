"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's layout, a SigLIP tower, fewer cells.

As LLaVA-NeXT (see llava_next.py): the base image (the picture stretched to the tower's 384-pixel
input, 27 x 27 patches) and then the tiles as one unpadded mosaic with `<image_newline>` after
each row. Two differences: SigLIP has no CLS feature (`vision_feature_select_strategy` 'full'
keeps every patch), and with `vision_aspect_ratio` anyres_max_N a mosaic of more than about N
tiles' worth of cells is resampled bilinearly to fewer, int(rows / ratio) x int(cols / ratio)
with ratio = sqrt(rows * cols / (N * 27^2)) when above 1.1 (`pack_image_features`): the grid
still covers the same part of the picture, each cell now a blend of the ones it replaced.
"""

import math

from . import register
from .llava_next import LlavaNext


@register
class LlavaOnevision(LlavaNext):
    model_types = ("llava_onevision",)
    family = "LLaVA-OneVision"
    stop_tokens = ("<|im_end|>",)  # its built-in prompt is its Qwen2 decoder's ChatML
    modeling = "transformers.models.llava_onevision.modeling_llava_onevision"
    strategies = ("full",)  # SigLIP: no CLS feature to drop

    def builtin_prompt(self, prompt, num_images, system):  # its Qwen2 decoder's ChatML
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        images = (self.image_token + "\n") * num_images
        return f"{head}<|im_start|>user\n{images}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def image_feature_kwargs(self):
        return {**super().image_feature_kwargs(),
                "vision_aspect_ratio": getattr(self.config, "vision_aspect_ratio", "anyres_max_9")}

    def shrunk(self, rows, cols):
        most = int(str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9")).strip("anyres_max_"))
        ratio = math.sqrt(rows * cols / (most * self.side ** 2))
        return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)
