"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`): sub-images.

The chat template writes `<image>` once per image. The image processor resizes the picture
(longest edge at most `size`), stretches it to whole multiples of the tile size
(`max_image_size`: 364 px for Idefics3, 512 for SmolVLM) and cuts it into R x C tiles, row by
row, then adds the whole picture stretched to one tile (the global image); a picture no larger
than one tile is that one image only. The processor writes, for each tile,
`<fake_token_around_image><row_r_col_c>` followed by the tile's image tokens, a line break after
each row of tiles, then `\\n<fake_token_around_image><global-img>`, the global image's tokens and
`<fake_token_around_image>`. Each tile's patches are pixel-shuffled (`scale_factor` 2 or 4) into
a (side / scale) x (side / scale) grid, row-major (the connector's `pixel_shuffle`): 13 x 13 for
Idefics3, 8 x 8 for SmolVLM. So an image is one view per tile (`tile r,c`, its region of the
picture) and the global view, each its own run of image tokens between marker tokens (the
markers are text, template markup). The language model is causal.
"""

from . import ImageBatch, View, VisionAdapter, register, tile_region
from ..errors import UnsupportedModelError

FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


@register
class Idefics3(VisionAdapter):
    model_types = ("idefics3", "smolvlm")
    family = "Idefics3 / SmolVLM"
    stop_tokens = ("<end_of_utterance>",)

    def __init__(self, config, tokenizer, image_processor):
        super().__init__(config, tokenizer, image_processor)
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        for token in (FAKE, GLOBAL, "<row_1_col_1>"):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise UnsupportedModelError(f"this {config.model_type} tokenizer has no {token} token")
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size // config.scale_factor  # tokens a side of one tile
        self.family = "SmolVLM" if config.model_type == "smolvlm" else "Idefics3"

    def image_text(self, views):
        text, row = "", 0
        for view in views:
            if view.tile:
                if view.tile[0] != row:  # a line break after each row of tiles
                    text, row = text + "\n", view.tile[0]
                text += f"{FAKE}<row_{view.tile[0] + 1}_col_{view.tile[1] + 1}>" + self.image_token * view.tokens
        if any(view.tile for view in views):
            text += "\n\n"
        return text + f"{FAKE}{GLOBAL}" + self.image_token * views[-1].tokens + FAKE

    def builtin_prompt(self, prompt, num_images, system):
        bos = self.tokenizer.bos_token or ""
        head = f"System: {system}<end_of_utterance>\n" if system else ""
        return f"{bos}{head}User:{self.image_token * num_images}{prompt}<end_of_utterance>\nAssistant:"

    def process_images(self, images):
        processed = self.image_processor(images=images, return_row_col_info=True, return_tensors="pt")
        views = []
        # one list per batch sample (the processor may take each image as its own sample)
        rows_of = [n for sample in processed["rows"] for n in sample]
        cols_of = [n for sample in processed["cols"] for n in sample]
        for image, rows, cols in zip(images, rows_of, cols_of):
            width, height = image.size
            tiles = [View(self.side, self.side, region=tile_region(width, height, rows, cols, r, c), name=f"tile {r},{c}",
                          tile=(r, c)) for r in range(rows) for c in range(cols)]
            views.append(tiles + [View(self.side, self.side, name="global" if tiles else "")])
        kwargs = {"pixel_values": processed["pixel_values"]}
        if "pixel_attention_mask" in processed:
            kwargs["pixel_attention_mask"] = processed["pixel_attention_mask"]
        return ImageBatch(kwargs=kwargs, views=views)

