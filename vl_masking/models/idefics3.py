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

The tower (the encoder measures): a SigLIP-like ViT (no CLS token), each tile and the global image one batch
entry (the processor's all-zero padding images dropped, as the model drops them), every block reaching the
connector; the patches under a language-model token are those the connector's own `pixel_shuffle` gathers
into it (read by running it on patch indices). A tile with padded patches is refused.
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

    def tower_refusal(self):
        return None

    def tower_blocks(self):
        depth = self.config.vision_config.num_hidden_layers
        return depth, list(range(depth)), None

    def tower(self, model, model_kwargs, views):
        from ..errors import UsageError
        from ..tower import Tower, clip_anatomy, shuffled_cells

        inner = model.model
        vision, connector = inner.vision_model, inner.connector
        pixels = model_kwargs["pixel_values"]
        flat = pixels.reshape(-1, *pixels.shape[2:])
        real = (flat != 0).flatten(1).any(dim=1)  # the model drops the all-zero padding images
        mask = model_kwargs.get("pixel_attention_mask")
        if mask is not None and not bool(mask.reshape(-1, *mask.shape[2:])[real].all()):
            raise UsageError(f"the encoder measures do not reproduce {self.family}'s padded patches: this picture "
                             "leaves part of a tile empty")
        patches = flat.shape[-1] // self.config.vision_config.patch_size
        under = shuffled_cells(lambda index: connector.pixel_shuffle(index.reshape(1, -1, 1), connector.scale_factor),
                               patches)
        length = patches * patches
        cells, pictures, entry = [], [], 0
        for picture in views:
            cells.append([tile * length + cell for tile in range(entry, entry + len(picture)) for cell in under])
            pictures.append((entry * length, (entry + len(picture)) * length))
            entry += len(picture)
        if entry != int(real.sum()):
            raise RuntimeError(f"{entry} views of the pictures, {int(real.sum())} tiles in the tower's input")
        blocks = vision.encoder.layers
        return Tower(module=vision, blocks=blocks, anatomy=clip_anatomy(), num_heads=blocks[0].self_attn.num_heads,
                     cells=cells, pictures=pictures, measured=self.tower_blocks()[1],
                     run=lambda kw: inner.get_image_features(kw["pixel_values"], kw.get("pixel_attention_mask")))

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

