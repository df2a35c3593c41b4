"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE): one layout for the whole family.

Each image becomes the run of `<|image_pad|>` tokens between `<|vision_start|>` and
`<|vision_end|>`. The processor resizes it to a multiple of patch x merge pixels and returns
`image_grid_thw[k] = (t, h, w)` in patches; the language model sees (h / merge) x (w / merge)
tokens in row-major order of the merged grid (merge = 2), so token i of an image sits at
row i // (w / merge), column i % (w / merge): a 160x96 image is a 3x5 grid, never a square root.
The model's own decoder is causal over every token; M-RoPE positions come from
`mm_token_type_ids` (1 at image tokens), which the processor would make and this adapter makes.
Qwen3-VL's DeepStack adds visual features to the image rows after its first layers: layer_additions
reads them from the language model's call (`deepstack_visual_embeds` at `visual_pos_masks`).
Images more than 200 times longer than wide (or the reverse) are refused by the family's resize.

The tower (the encoder measure): patches in merge-block order, so the merge x merge patches under
one language-model token are consecutive, and the merger turns every merge^2 tower tokens into one
token. Each picture attends only to itself (`cu_seqlens`); there is no CLS token, and every block
reaches the language model (Qwen3-VL's DeepStack taps some on the way). A block is pre-norm
attention with a 2D rotary embedding, then an MLP. Qwen2.5-VL reorders the tokens into windows
before its blocks (read by tower.block_order) and attends within each window except in its
`fullatt_block_indexes`: a block's own segments (its `cu_seqlens`) are what a knockout keeps, so a
patch never sees what its window hides. A video goes through the same tower, one segment per temporal
patch: its patches see only their own frame's, so a frame hidden there changes nothing in the others.
"""

import torch

from . import ImageBatch, View, VisionAdapter, register

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
MAX_ASPECT_RATIO = 200


@register
class QwenVL(VisionAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
    family = "Qwen-VL"
    image_token = IMAGE_PAD
    video_token = VIDEO_PAD
    stop_tokens = ("<|im_end|>", "<|endoftext|>")

    @property
    def qwen3(self) -> bool:
        return self.config.model_type.startswith("qwen3")

    def builtin_prompt(self, prompt, num_images, system, num_videos=0):
        vision = (VISION_START + IMAGE_PAD + VISION_END) * num_images + (VISION_START + VIDEO_PAD + VISION_END) * num_videos
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{vision}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def process_images(self, images):
        processed = self.image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        merge = getattr(self.image_processor, "merge_size", 2)
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in grid.tolist()]
        return ImageBatch(kwargs={"pixel_values": processed["pixel_values"], "image_grid_thw": grid},
                          views=[[View(rows, cols)] for rows, cols in grids])

    @property
    def video_placeholder(self):
        # Qwen3-VL's processor replaces the template's whole wrapper: each temporal patch gets its own
        return VISION_START + VIDEO_PAD + VISION_END if self.qwen3 else VIDEO_PAD

    def process_videos(self, sources, fps, max_frames):
        from ..video import read_frames
        from . import VideoClip
        from .qwen_video import (DEFAULT_SOURCE_FPS, pixel_values, sample_indices, sampled_fps, temporal_patch_frames,
                                 temporal_patch_times, video_processor_dict, video_rules, with_options)

        rules = with_options(video_rules(video_processor_dict(self.config.name_or_path), self.qwen3), fps, max_frames)
        merge = rules.merge_size
        patches, grids, views, clips, seconds = [], [], [], [], []
        for source in sources:
            indices = sample_indices(rules, source.frames, source.fps)
            values, (t, h, w) = pixel_values(rules, read_frames(source, indices))
            times = temporal_patch_times(rules, indices, source.fps)
            frames = temporal_patch_frames(rules, indices)
            patches.append(values)
            grids.append((t, h, w))
            views.append([View(h // merge, w // merge, name=f"frame {k}", video=True, time=times[k], frames=frames[k])
                          for k in range(t)])
            clips.append(VideoClip(source.path, source.frames, source.fps,
                                   None if source.fps else DEFAULT_SOURCE_FPS, tuple(indices), source.width,
                                   source.height))
            seconds.append(rules.temporal_patch_size / sampled_fps(indices, source.frames, source.fps))
        kwargs = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}
        if self.config.model_type == "qwen2_5_vl":  # its temporal positions count seconds
            kwargs["second_per_grid_ts"] = torch.tensor(seconds)
        return ImageBatch(kwargs=kwargs, views=views, clips=clips)

    def video_text(self, views):
        if not self.qwen3:
            return VIDEO_PAD * sum(view.tokens for view in views)
        # Qwen3-VL: the time of each temporal patch as text before it (the processor's replace_video_token)
        return "".join(f"<{view.time:.1f} seconds>" + VISION_START + VIDEO_PAD * view.tokens + VISION_END
                       for view in views)

    def position_kwargs(self, input_ids, batch):
        # M-RoPE's modality of each position: text 0, image 1, video 2
        video = self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long() + 2 * (input_ids == video).long()}

    def layer_additions(self, text_model_kwargs):
        embeds = text_model_kwargs.get("deepstack_visual_embeds")
        if embeds is None:
            return None
        return text_model_kwargs["visual_pos_masks"][0].detach(), [e.detach() for e in embeds]

    def deepstack_levels(self):
        # Qwen3VLTextModel adds level l's features after decoder layer l, for the levels the layers reach
        taps = getattr(self.config.vision_config, "deepstack_visual_indexes", None) or []
        return [(int(block), level) for level, block in enumerate(taps)
                if level < self.config.text_config.num_hidden_layers]

    def tower_refusal(self):
        return None

    def tower_blocks(self):
        depth = self.config.vision_config.depth
        return depth, list(range(depth)), None

    def tower(self, model, model_kwargs, views):
        from ..tower import BlockAnatomy, Tower, block_order

        visual = model.model.visual
        merge = visual.spatial_merge_size ** 2
        # the prompt's images, or its videos (the model runs the tower once on each; the measures take one)
        keys = ("pixel_values", "image_grid_thw") if "pixel_values" in model_kwargs else ("pixel_values_videos",
                                                                                          "video_grid_thw")
        pixels, grid = model_kwargs[keys[0]].to(visual.dtype), model_kwargs[keys[1]]
        position = torch.arange(len(pixels))  # where each patch of the processor's order is in the blocks' order
        if getattr(visual.config, "window_size", None):  # Qwen2.5-VL: the windows' order
            position[block_order(visual, visual.patch_embed, visual.blocks[0], pixels, {"grid_thw": grid})] = \
                torch.arange(len(pixels))
        cells, pictures, offset = [], [], 0
        for t, h, w in grid.tolist():
            tokens = t * h * w
            cells.append([position[offset + j * merge: offset + (j + 1) * merge] for j in range(tokens // merge)])
            pictures.append((offset, offset + tokens))  # windows never cross pictures: each stays in its range
            offset += tokens
        anatomy = BlockAnatomy(attention_inputs=_attention_inputs, attention_output=_attention_output,
                               after_attention=_after_attention, segments=_segments,
                               scaling=lambda block: block.attn.scaling)
        return Tower(module=visual, blocks=visual.blocks, anatomy=anatomy, num_heads=visual.blocks[0].attn.num_heads,
                     cells=cells, pictures=pictures, measured=self.tower_blocks()[1],
                     run=lambda kw: visual(kw[keys[0]].to(visual.dtype), grid_thw=kw[keys[1]]))

    def check_image_size(self, path, width, height):
        if min(width, height) == 0 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            return (f"image {path} is {width}x{height}: its aspect ratio is above {MAX_ASPECT_RATIO}, which the "
                    "Qwen-VL image processor does not accept")
        return None


def _attention_inputs(block, x, kwargs):
    """q, k, v (H, S, d) in float32: the block's norm, its qkv projection, the 2D rotary embedding on q and k."""
    attention = block.attn
    q, k, v = attention.qkv(block.norm1(x)).reshape(x.shape[0], 3, attention.num_heads, -1).unbind(1)  # (S, H, d)
    cos, sin = (t.unsqueeze(-2).float() for t in kwargs["position_embeddings"])

    def rotated(t):
        t = t.float()
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

    return rotated(q).transpose(0, 1), rotated(k).transpose(0, 1), v.float().transpose(0, 1)


def _attention_output(block, o):
    return block.attn.proj(o.to(block.attn.proj.weight.dtype))


def _after_attention(block, x, attended):
    hidden = x + attended.to(x.dtype)
    return hidden + block.mlp(block.norm2(hidden))


def _segments(kwargs, shape):
    """The runs of tokens that attend to each other: each picture (each temporal slice), or each window."""
    bounds = kwargs["cu_seqlens"].tolist()
    return list(zip(bounds[:-1], bounds[1:]))
