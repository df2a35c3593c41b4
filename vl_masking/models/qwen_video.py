"""Qwen-VL videos as the family's video processor makes them, without torchvision.

transformers' Qwen2VLVideoProcessor (Qwen2-VL, Qwen2.5-VL) and Qwen3VLVideoProcessor need torchvision, which has no
working CPU build on many machines. This module does what they do, step by step, with torch alone:

1. Settings: the processor's class defaults, overridden by the checkpoint's video-processor config, read in the
   order transformers reads it (processor_config.json's "video_processor", video_preprocessor_config.json, then
   preprocessor_config.json); Qwen2-VL's min_pixels / max_pixels become its size, as its __init__ does.
2. Frames sampled as the family's sample_frames does (Qwen3-VL: fps 2 by default, linspace, rounded; Qwen2-VL:
   only when asked, an arange with a float step, a multiple of the temporal patch).
3. Each frame resized to the family's smart_resize (Qwen3-VL counts the frames in its pixel budget) with bicubic
   antialiased interpolation on the uint8 frames: torchvision's CPU path (torch's native uint8 kernel).
4. Rescale and normalize fused, as the processor fuses them: (x - mean / r) / (std / r) in float32.
5. An odd frame count padded with the last frame; patches in merge-block order (patchify's permutation).
6. Qwen3-VL writes `<{t:.1f} seconds>` before each temporal patch, t the mean time of its first and last frame;
   Qwen2.5-VL takes `second_per_grid_ts` = temporal patch / sampled frames per second.

tests/test_video.py checks every step against the processor's own code (its module run with the two torchvision
calls it makes supplied), and bench/check_video_processor.py against the processor itself where torchvision exists.
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_STANDARD_MEAN = IMAGENET_STANDARD_STD = [0.5, 0.5, 0.5]
BICUBIC, BILINEAR = 3, 2  # PIL's resampling numbers, as the configs write them
MODES = {BICUBIC: "bicubic", BILINEAR: "bilinear"}
DEFAULT_SOURCE_FPS = 24  # what the processors assume for frames with no frame rate (a folder of frames)


@dataclass(frozen=True)
class VideoRules:
    """One checkpoint's video-processor settings."""

    qwen3: bool  # Qwen3VLVideoProcessor (else Qwen2VLVideoProcessor)
    shortest_edge: int  # the pixel budget's floor ...
    longest_edge: int  # ... and ceiling (Qwen3-VL: of the whole clip, frames times pixels)
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple
    image_std: tuple
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = BICUBIC
    do_sample_frames: bool = True
    fps: float | None = None
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768


def class_defaults(qwen3: bool) -> dict:
    """The processor class's own defaults (transformers 5.x)."""
    if qwen3:
        return dict(qwen3=True, shortest_edge=128 * 32 * 32, longest_edge=32 * 32 * 768, patch_size=16,
                    temporal_patch_size=2, merge_size=2, image_mean=tuple(IMAGENET_STANDARD_MEAN),
                    image_std=tuple(IMAGENET_STANDARD_STD), do_sample_frames=True, fps=2, max_video_tokens=768)
    return dict(qwen3=False, shortest_edge=128 * 28 * 28, longest_edge=28 * 28 * 768, patch_size=14,
                temporal_patch_size=2, merge_size=2, image_mean=tuple(OPENAI_CLIP_MEAN),
                image_std=tuple(OPENAI_CLIP_STD), do_sample_frames=False, fps=None, max_video_tokens=128000)


def video_processor_dict(model_dir: str) -> dict:
    """The checkpoint's video-processor settings, found where transformers looks ({} when none is there, or for a
    model made from a config alone)."""
    from transformers.utils import cached_file

    if not model_dir:
        return {}
    def found(name):
        try:
            path = cached_file(model_dir, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        return json.loads(Path(path).read_text(encoding="utf-8")) if path else None

    nested = found("processor_config.json")
    if nested and "video_processor" in nested:
        return nested["video_processor"]
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        settings = found(name)
        if settings is not None:
            return settings
    return {}


def video_rules(settings: dict, qwen3: bool) -> VideoRules:
    """The class defaults overridden by a config's keys, as the class's from_dict sets them."""
    rules = class_defaults(qwen3)
    size = dict(settings.get("size") or {})
    if not qwen3:  # Qwen2VLVideoProcessor.__init__: min_pixels / max_pixels override the size
        if settings.get("min_pixels") is not None:
            size["shortest_edge"] = settings["min_pixels"]
        if settings.get("max_pixels") is not None:
            size["longest_edge"] = settings["max_pixels"]
    if size.get("shortest_edge"):
        rules["shortest_edge"] = int(size["shortest_edge"])
    if size.get("longest_edge"):
        rules["longest_edge"] = int(size["longest_edge"])
    rules.update(overrides(settings, ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "do_resize",
                                      "do_rescale", "do_normalize", "resample", "do_sample_frames", "fps", "num_frames",
                                      "min_frames", "max_frames", "cap_pixels_per_frame", "max_video_tokens")))
    return VideoRules(**rules)


def overrides(settings: dict, keys: tuple) -> dict:
    """A config's values of these keys, and its image_mean and image_std (one number: for each channel), as a video
    processor's from_dict sets them; a resampling mode this tool does not reproduce is refused in one line."""
    rules = {key: settings[key] for key in keys if settings.get(key) is not None}
    for key in ("image_mean", "image_std"):
        if settings.get(key) is not None:
            value = settings[key]
            rules[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
    if int(rules.get("resample", BICUBIC)) not in MODES:
        raise UsageError(f"the checkpoint's video processor resamples with mode {rules['resample']}; this tool "
                         "reproduces bicubic and bilinear")
    return rules


def with_options(rules: VideoRules, fps: float | None, max_frames: int | None) -> VideoRules:
    """--fps and --max-frames, as the processor's call takes fps and its max_frames setting: either turns sampling
    on. A family with no frame rate of its own (Qwen2-VL) samples --max-frames frames evenly when --fps is not given."""
    if fps is None and max_frames is None:
        return rules
    changed = replace(rules, do_sample_frames=True, fps=fps if fps is not None else rules.fps,
                      max_frames=max_frames if max_frames is not None else rules.max_frames)
    if changed.fps is None and max_frames is not None:
        changed = replace(changed, num_frames=max_frames)
    return changed


# -- 2. sampling ----------------------------------------------------------------------

def sample_indices(rules: VideoRules, total: int, source_fps: float | None) -> list:
    """The source frames the processor takes, in order."""
    if not rules.do_sample_frames:
        return list(range(total))
    if rules.qwen3:
        return _sample_qwen3(rules, total, source_fps)
    return _sample_qwen2(rules, total, source_fps)


def _sample_qwen3(rules, total, source_fps):
    num_frames, fps = rules.num_frames, rules.fps
    if num_frames is None and fps is not None:
        source_fps = source_fps or DEFAULT_SOURCE_FPS
        num_frames = int(total / source_fps * fps)
        num_frames = min(max(num_frames, rules.min_frames), rules.max_frames, total)
    if num_frames is None:
        num_frames = min(max(total, rules.min_frames), rules.max_frames)
    return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()


def _sample_qwen2(rules, total, source_fps):
    step = rules.temporal_patch_size
    num_frames = rules.num_frames
    if num_frames is not None:
        num_frames = round(num_frames / step) * step
    elif rules.fps is not None:
        if source_fps is None:
            raise UsageError("--fps: a folder of frames has no frame rate for Qwen2-VL's sampling; give --max-frames")
        most = math.floor(min(rules.max_frames, total) / step) * step
        num_frames = total / source_fps * rules.fps
        num_frames = min(max(num_frames, rules.min_frames), most, total)
        num_frames = math.floor(num_frames / step) * step
    if num_frames is None:
        return list(range(total))
    if num_frames == 0 or num_frames > total:
        raise UsageError(f"the video holds {total} frame(s): Qwen2-VL's sampling takes {num_frames} "
                         f"(a multiple of {step}, at most the frames there are)")
    return torch.arange(0, total, total / num_frames).int().tolist()


# -- 3-5. pixels ----------------------------------------------------------------------

def resized_size(rules: VideoRules, frames: int, height: int, width: int) -> tuple:
    """(height, width) after the family's smart_resize."""
    factor = rules.patch_size * rules.merge_size
    if not rules.qwen3:
        most = rules.longest_edge
        if rules.cap_pixels_per_frame:
            total = int(rules.max_video_tokens * factor * factor * 0.9)
            most = max(min(most, total * rules.temporal_patch_size // frames), int(rules.shortest_edge * 1.05))
        return _smart_resize(height, width, factor, rules.shortest_edge, most, frames=1, temporal=1)
    most = rules.longest_edge
    if rules.cap_pixels_per_frame:
        per_frame = max(min(rules.max_video_tokens * factor * factor, rules.longest_edge // frames),
                        int(rules.shortest_edge * 1.05))
        most = per_frame * frames
    if frames < rules.temporal_patch_size:
        raise UsageError(f"Qwen3-VL's video processor needs at least {rules.temporal_patch_size} frames "
                         f"(the clip gives {frames})")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    return _smart_resize(height, width, factor, rules.shortest_edge, most, frames=frames,
                         temporal=rules.temporal_patch_size)


def _smart_resize(height, width, factor, least, most, frames, temporal):
    if max(height, width) / min(height, width) > 200:
        raise UsageError(f"the video's frames are {width}x{height}: an aspect ratio above 200, which the Qwen-VL "
                         "video processor does not accept")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(frames / temporal) * temporal
    if t_bar * h_bar * w_bar > most:
        beta = math.sqrt((frames * height * width) / most)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < least:
        beta = math.sqrt(least / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_values(rules: VideoRules, frames: np.ndarray) -> tuple:
    """(T, H, W, 3) uint8 frames -> (patches (n, C * t * p * p) float32, (grid_t, grid_h, grid_w))."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W) uint8
    count, _, height, width = video.shape
    if rules.do_resize:
        size = resized_size(rules, count, height, width)
        if size != (height, width):  # torchvision returns the frames untouched at their own size
            # torchvision's CPU path for uint8 bicubic (and bilinear): torch's native uint8 kernel, antialiased
            video = torch.nn.functional.interpolate(video, size=list(size), mode=MODES[int(rules.resample)],
                                                    align_corners=False, antialias=True)
    video = normalized(rules, video)[None]  # (1, T, 3, H, W)
    return patchify(rules, video)


def normalized(rules: VideoRules, video: torch.Tensor) -> torch.Tensor:
    """Rescale and normalize as the processor fuses them (mean and std divided by the rescale factor)."""
    if rules.do_rescale and rules.do_normalize:
        mean = torch.tensor(rules.image_mean) * (1.0 / rules.rescale_factor)
        std = torch.tensor(rules.image_std) * (1.0 / rules.rescale_factor)
        return (video.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    if rules.do_normalize:
        return (video.to(torch.float32) - torch.tensor(rules.image_mean)[:, None, None]) / \
            torch.tensor(rules.image_std)[:, None, None]
    if rules.do_rescale:
        return video * rules.rescale_factor
    return video


def patchify(rules: VideoRules, videos: torch.Tensor) -> tuple:
    """(1, T, C, H, W) -> (patches in merge-block order, (grid_t, grid_h, grid_w)); an odd T padded with the last frame."""
    batch, count, channels, height, width = videos.shape
    step, patch, merge = rules.temporal_patch_size, rules.patch_size, rules.merge_size
    if pad := -count % step:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        count += pad
    grid_t, grid_h, grid_w = count // step, height // patch, width // patch
    patches = videos.reshape(batch, grid_t, step, channels, grid_h // merge, merge, patch, grid_w // merge, merge,
                             patch)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(batch * grid_t * grid_h * grid_w, channels * step * patch * patch)
    return flat, (grid_t, grid_h, grid_w)


# -- 6. times -------------------------------------------------------------------------

def temporal_patch_times(rules: VideoRules, indices: list, source_fps: float | None) -> list:
    """Each temporal patch's time in seconds: the mean of its first and last frame's (the processor's timestamps;
    a padded patch repeats its last frame)."""
    fps = source_fps or DEFAULT_SOURCE_FPS
    step = rules.temporal_patch_size
    padded = list(indices) + [indices[-1]] * (-len(indices) % step)
    times = [i / fps for i in padded]
    return [(times[i] + times[i + step - 1]) / 2 for i in range(0, len(times), step)]


def temporal_patch_frames(rules: VideoRules, indices: list) -> list:
    """The source frames of each temporal patch."""
    step = rules.temporal_patch_size
    padded = list(indices) + [indices[-1]] * (-len(indices) % step)
    return [tuple(padded[i:i + step]) for i in range(0, len(padded), step)]


def sampled_fps(indices: list, total: int, source_fps: float | None) -> float:
    """VideoMetadata.sampled_fps: the frame rate of the sampled frames."""
    if not source_fps:
        return DEFAULT_SOURCE_FPS
    return len(indices) / total * source_fps
