"""Gemma 3 (`Gemma3ForConditionalGeneration`): a fixed pooled grid per image, images bidirectional.

The chat template writes `<start_of_image>` once per image; the processor replaces it with
"\\n\\n<start_of_image>" + `<image_soft_token>` x mm_tokens_per_image + "<end_of_image>\\n\\n".
The SigLIP tower sees the picture resized to its square input (896 px, stretched: no crop, so the
grid covers the whole picture); its (896 / 14)^2 = 64 x 64 patches are average-pooled 4 x 4 into
16 x 16 = 256 soft tokens, row-major: token i sits at row i // 16, column i % 16 of the picture.

The model's own prompt attention is causal plus bidirectional within each image (transformers
builds it from `token_type_ids`); so `--vision-attention bidirectional` is what the model does,
and the engines make that mask themselves (the adapter passes no token_type_ids, so that
`causal` really is causal). Local layers see a sliding window of keys; an image's tokens see each
other only inside it, as in the model. Pan-and-scan (extra crops per image) is refused.

The tower (the encoder measures): SigLIP, each picture one batch entry, no CLS token; every block
reaches the language model (the projector pools the last block's output); the tower tokens under
soft token (r, c) are the k x k patches rows r*k.., columns c*k.. of the patch grid, k = 4.
"""

import torch

from . import ImageBatch, View, VisionAdapter, register
from ..errors import UnsupportedModelError


@register
class Gemma3(VisionAdapter):
    model_types = ("gemma3",)
    family = "Gemma 3"
    stop_tokens = ("<end_of_turn>",)
    native_vision_attention = "bidirectional"

    def __init__(self, config, tokenizer, image_processor):
        super().__init__(config, tokenizer, image_processor)
        if getattr(image_processor, "do_pan_and_scan", False):
            raise UnsupportedModelError("Gemma 3 with do_pan_and_scan (extra crops per image) is not supported yet")
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.start = tokenizer.convert_ids_to_tokens(config.boi_token_id)
        self.end = tokenizer.convert_ids_to_tokens(config.eoi_token_id)
        self.side = int(round(config.mm_tokens_per_image ** 0.5))
        if self.side * self.side != config.mm_tokens_per_image:
            raise UnsupportedModelError(f"Gemma 3 with mm_tokens_per_image {config.mm_tokens_per_image} (not a square)")

    @property
    def placeholder(self):
        return self.start

    def image_text(self, views):
        return f"\n\n{self.start}{super().image_text(views)}{self.end}\n\n"

    def builtin_prompt(self, prompt, num_images, system):
        bos = self.tokenizer.bos_token or ""
        head = f"{system}\n\n" if system else ""  # Gemma has no system role: the template prefixes the user turn
        return f"{bos}<start_of_turn>user\n{head}{self.start * num_images}{prompt}<end_of_turn>\n<start_of_turn>model\n"

    def tower_refusal(self):
        kind = self.config.vision_config.model_type
        return None if kind == "siglip_vision_model" else f"the encoder measure does not reproduce a {kind} tower"

    def tower_blocks(self):
        depth = self.config.vision_config.num_hidden_layers
        return depth, list(range(depth)), None

    def tower(self, model, model_kwargs, views):
        from ..tower import Tower, clip_anatomy

        vision = model.model.vision_tower
        patches = self.config.vision_config.image_size // self.config.vision_config.patch_size  # per side
        k = patches // self.side  # the pooling: k x k patches under one soft token
        length = patches * patches
        pixels = model_kwargs["pixel_values"]
        cells = [[torch.tensor([i * length + (r * k + dr) * patches + c * k + dc for dr in range(k) for dc in range(k)])
                  for r in range(self.side) for c in range(self.side)] for i in range(len(pixels))]
        blocks = getattr(vision, "vision_model", vision).encoder.layers  # the module tree differs by version
        return Tower(module=vision, blocks=blocks, anatomy=clip_anatomy(), num_heads=blocks[0].self_attn.num_heads,
                     cells=cells, pictures=[(i * length, (i + 1) * length) for i in range(len(pixels))],
                     measured=self.tower_blocks()[1], run=lambda kw: vision(kw["pixel_values"].to(vision.dtype)))

    def process_images(self, images):
        processed = self.image_processor(images=images, return_tensors="pt")
        return ImageBatch(kwargs={"pixel_values": processed["pixel_values"]},
                          views=[[View(self.side, self.side)] for _ in images])
