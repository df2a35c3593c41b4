"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's layout, a SigLIP tower, fewer cells.

As LLaVA-NeXT (see llava_next.py): the base image (the picture stretched to the tower's 384-pixel
input, 27 x 27 patches) and then the tiles as one unpadded mosaic with `<image_newline>` after
each row. Two differences: SigLIP has no CLS feature (`vision_feature_select_strategy` 'full'
keeps every patch), and with `vision_aspect_ratio` anyres_max_N a mosaic of more than about N
tiles' worth of cells is resampled bilinearly to fewer, int(rows / ratio) x int(cols / ratio)
with ratio = sqrt(rows * cols / (N * 27^2)) when above 1.1 (`pack_image_features`): the grid
still covers the same part of the picture, each cell now a blend of the ones it replaced.

Videos (`<video>`): every frame is a base image (no tiles), its s x s patches pooled bilinearly to
ceil(s / 2) a side (each token a blend: `blended`), the frames one after the other, and one
`<image_newline>` closing the video (the last frame's view's `trailer`). onevision_video.py builds the
processor's inputs. The model stacks a prompt's videos into one tensor, so a prompt takes one video here.
"""

import math

import torch

from . import ImageBatch, View, register
from .llava_next import NEWLINE, LlavaNext


@register
class LlavaOnevision(LlavaNext):
    model_types = ("llava_onevision",)
    family = "LLaVA-OneVision"
    stop_tokens = ("<|im_end|>",)  # its built-in prompt is its Qwen2 decoder's ChatML
    modeling = "transformers.models.llava_onevision.modeling_llava_onevision"
    strategies = ("full",)  # SigLIP: no CLS feature to drop

    video_token = "<video>"
    videos_per_prompt = 1

    def builtin_prompt(self, prompt, num_images, system, num_videos=0):  # its Qwen2 decoder's ChatML
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        pictures = (self.image_token + "\n") * num_images + (self.video_token + "\n") * num_videos
        return f"{head}<|im_start|>user\n{pictures}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def process_videos(self, sources, fps, max_frames):
        from ..video import read_frames
        from . import VideoClip
        from .onevision_video import pixel_values, pooled_side, sample_indices, video_rules, with_options
        from .qwen_video import video_processor_dict

        rules = with_options(video_rules(video_processor_dict(self.config.name_or_path)), fps, max_frames)
        side = pooled_side(self.config.vision_config)
        videos, views, clips = [], [], []
        for source in sources:
            indices = sample_indices(rules, source.frames, source.fps)
            videos.append(pixel_values(rules, read_frames(source, indices)))
            last = len(indices) - 1
            views.append([View(side, side, name=f"frame {k}", blended=True, video=True, frames=(index,),
                               time=index / source.fps if source.fps else None, trailer=NEWLINE if k == last else "")
                          for k, index in enumerate(indices)])
            clips.append(VideoClip(source.path, source.frames, source.fps, None, tuple(indices), source.width,
                                   source.height))
        return ImageBatch(kwargs={"pixel_values_videos": torch.cat(videos)}, views=views, clips=clips)

    def image_feature_kwargs(self):
        return {**super().image_feature_kwargs(),
                "vision_aspect_ratio": getattr(self.config, "vision_aspect_ratio", "anyres_max_9")}

    def shrunk(self, rows, cols):
        most = int(str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9")).strip("anyres_max_"))
        ratio = math.sqrt(rows * cols / (most * self.side ** 2))
        return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)
