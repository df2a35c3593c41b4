"""LLaVA-OneVision videos as LlavaOnevisionVideoProcessor makes them, without torchvision.

The processor is transformers' BaseVideoProcessor with the family's settings; it needs torchvision, which has no
working CPU build on many machines. What it does, with torch alone:

1. Settings: the class defaults (every frame at 384 x 384, bicubic, CLIP's mean and std), overridden by the
   checkpoint's video-processor config where transformers finds it (qwen_video.video_processor_dict).
2. Frames: every frame of the source unless asked (the class does not sample: do_sample_frames False); --fps or
   --max-frames sample as the processor's sample_frames does (default_sample_indices_fn: n frames at
   arange(n) * total // n, n = total / source fps * fps for --fps).
3. Each frame resized to the processor's size (bicubic, antialiased, on the uint8 frames: torchvision's CPU path)
   and rescaled and normalized fused, as qwen_video does.

The model runs the tower on every frame, pools each frame's grid of s x s patches bilinearly to ceil(s / 2) a side
(`apply_pooling`) and ends the video with one `image_newline`: the prompt holds frames x ceil(s / 2)^2 + 1 video
tokens. tests/test_video.py checks the pixels, the frames and the token count against the processor's own code.
"""

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import UsageError
from .qwen_video import BICUBIC, MODES, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalized, overrides


@dataclass(frozen=True)
class OnevisionVideoRules:
    """One checkpoint's video-processor settings."""

    height: int = 384
    width: int = 384
    image_mean: tuple = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple = tuple(OPENAI_CLIP_STD)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = BICUBIC
    do_sample_frames: bool = False
    fps: float | None = None
    num_frames: int | None = None


def video_rules(settings: dict) -> OnevisionVideoRules:
    """The class defaults overridden by a config's keys, as the class's from_dict sets them."""
    rules = overrides(settings, ("rescale_factor", "do_resize", "do_rescale", "do_normalize", "resample",
                                 "do_sample_frames", "fps", "num_frames"))
    size = dict(settings.get("size") or {})
    if size.get("height") and size.get("width"):
        rules["height"], rules["width"] = int(size["height"]), int(size["width"])
    return OnevisionVideoRules(**rules)


def with_options(rules: OnevisionVideoRules, fps: float | None, max_frames: int | None) -> OnevisionVideoRules:
    """--fps and --max-frames, as the processor's call takes fps or num_frames: either turns sampling on."""
    if fps is None and max_frames is None:
        return rules
    return replace(rules, do_sample_frames=True, fps=fps if fps is not None else rules.fps,
                   num_frames=max_frames if max_frames is not None else rules.num_frames)


def sample_indices(rules: OnevisionVideoRules, total: int, source_fps: float | None) -> list:
    """The source frames the processor takes, in order (default_sample_indices_fn); --max-frames caps the count
    that --fps asks for, and a count above the frames there are takes them all."""
    if not rules.do_sample_frames:
        return list(range(total))
    count = rules.num_frames
    if rules.fps is not None:
        if source_fps is None:
            raise UsageError("--fps: a folder of frames has no frame rate for LLaVA-OneVision's sampling; give "
                             "--max-frames")
        count = max(1, int(total / source_fps * rules.fps))
        count = min(count, rules.num_frames) if rules.num_frames is not None else count
    if count is None:
        return list(range(total))
    count = min(count, total)
    return (np.arange(count, dtype=int) * total // count).tolist()


def pixel_values(rules: OnevisionVideoRules, frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (1, T, 3, height, width) float32, as the model takes them."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W) uint8
    size = (rules.height, rules.width)
    if rules.do_resize and size != tuple(video.shape[-2:]):
        video = torch.nn.functional.interpolate(video, size=list(size), mode=MODES[int(rules.resample)],
                                                align_corners=False, antialias=True)
    return normalized(rules, video)[None]


def pooled_side(vision_config) -> int:
    """Tokens a side of a frame after the model's pooling: ceil(patches a side / 2)."""
    return math.ceil(vision_config.image_size // vision_config.patch_size / 2)
