"""Check mask-impact's video inputs against transformers' own video processors, where torchvision exists.

tests/test_video.py runs the processors' modules with torchvision's two CPU calls supplied (this machine has no
working torchvision); this script runs the processors as they are: Qwen2VLVideoProcessor (Qwen2-VL, Qwen2.5-VL),
Qwen3VLVideoProcessor and LlavaOnevisionVideoProcessor, on painted clips (an odd frame count, a folder of frames, an fps above the source's),
and compares the sampled frames, the grid and the pixel values with what mask-impact builds. The processors run
on the CPU, as they do by default (torchvision resizes uint8 frames with torch's native uint8 kernel there; on a
GPU it resizes in float and rounds, which can move a value by one grey level).

    python bench/check_video_processor.py [--json PATH]

Prints one JSON object: per case, whether everything is identical and the largest pixel-value difference; exits 1
when a case differs, 0 otherwise (and 0 with "skipped" where torchvision cannot be imported).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [("mp4", None, None), ("mp4", 2.0, None), ("folder", None, 5), ("slow", 2.0, None)]


def clips(root: Path) -> dict:
    from PIL import Image

    from vl_masking.tiny_models import painted_frame, write_clip

    folder = root / "frames"
    folder.mkdir()
    for k in range(7):
        Image.fromarray(painted_frame(k)).save(folder / f"frame{k:03d}.png")
    return {"mp4": write_clip(root / "odd.mp4", "libx264", 9, 4), "slow": write_clip(root / "slow.mp4", "libx264", 3, 1),
            "folder": folder}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    try:
        import torchvision  # noqa: F401 - whether it imports is the question
    except Exception as exc:  # noqa: BLE001 - any import failure means: nothing to compare against here
        result = {"skipped": f"torchvision cannot be imported ({type(exc).__name__})"}
        print(json.dumps(result))
        return 0
    from transformers import LlavaOnevisionVideoProcessor, Qwen2VLVideoProcessor, Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    from vl_masking.inputs import load_model
    from vl_masking.options import RunSettings
    from vl_masking.tiny_models import build_llava_onevision, build_qwen2_vl, build_qwen3_vl
    from vl_masking.video import probe, read_frames

    results, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made = clips(tmp)
        models = {"qwen3_vl": (build_qwen3_vl(tmp / "qwen3_vl", layers=1), Qwen3VLVideoProcessor),
                  "qwen2_vl": (build_qwen2_vl(tmp / "qwen2_vl", layers=1), Qwen2VLVideoProcessor),
                  "llava_onevision": (build_llava_onevision(tmp / "llava_onevision", layers=1, most_tiles=9),
                                      LlavaOnevisionVideoProcessor)}
        for family, (model, processor_class) in models.items():
            loaded = load_model(RunSettings(model=str(model), prompt="-", device="cpu"), weights=False)
            qwen = family != "llava_onevision"
            for clip, fps, max_frames in CASES:
                source = probe(str(made[clip]))
                ours = loaded.adapter.process_videos([source], fps, max_frames)
                options = {"cap_pixels_per_frame": False, **({"max_frames": max_frames} if max_frames else {})} \
                    if qwen else {}
                processor = processor_class.from_pretrained(str(model), **options)
                everything = read_frames(source, range(source.frames))
                if not qwen and fps is not None and (source.fps is None or
                                                     int(source.frames / source.fps * fps) > source.frames):
                    # LLaVA-OneVision's sampler raises an error for these: a folder has no frame rate (the tool
                    # refuses --fps there), and an fps above the source's asks more frames than there are (the tool
                    # takes every frame)
                    continue
                sampling = {"fps": fps} if fps is not None else (
                    {"num_frames": min(max_frames, source.frames)} if max_frames and processor.fps is None else {})
                sample = fps is not None or max_frames is not None or processor.do_sample_frames
                theirs = processor(videos=[everything], video_metadata=[VideoMetadata(
                    total_num_frames=source.frames, fps=source.fps)], do_sample_frames=sample, return_metadata=True,
                    return_tensors="pt", **sampling)
                indices = theirs["video_metadata"][0].frames_indices
                indices = list(range(source.frames)) if indices is None else [int(i) for i in indices]
                a, b = ours.kwargs["pixel_values_videos"], theirs["pixel_values_videos"]
                same = (list(ours.clips[0].indices) == indices
                        and (not qwen or torch.equal(ours.kwargs["video_grid_thw"], theirs["video_grid_thw"]))
                        and a.shape == b.shape and torch.equal(a, b))
                failed |= not same
                results.append({"family": family, "clip": clip, "fps": fps, "max_frames": max_frames,
                                "identical": bool(same), "largest_difference": float((a - b).abs().max())
                                if a.shape == b.shape else None})
    report = {"torch": torch.__version__, "cases": results}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
