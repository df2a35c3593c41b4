"""Benchmark of the encoder measure (inside the vision tower): our engine against the naive method and against one
forward of the tower, on a random-weight Qwen3-VL whose tower has the chosen size. Prints one JSON object (and
writes it with --json PATH):

    python bench/bench_encoder.py                                   # CPU mid case
    python bench/bench_encoder.py --preset qwen3-vl-4b --image-size 448 --device cuda    # GPU case

  tower_forward_s     one forward of the whole tower on the picture (sdpa), the fastest of three: what a
                      prompt costs the model
  encoder_s           the encoder measure's work: every measured block x every picture unit (tokens), all
                      variants, over all queries and outside the unit
  naive_s             the naive method: one re-run of the block's own forward (sdpa with a boolean key mask)
                      per unit and block; a sample of re-runs is timed one by one, and their median
                      extrapolated
  naive_over_encoder  how much faster the engine is
  encoder_over_tower  the encoder measure in forwards of the tower; its floor is about 0.7 x the number of
                      units (hiding a unit changes every query of its picture, so the block's projection and
                      MLP, about 9 of a block's 12 S x D x D products, run again on every row of the picture,
                      once per unit); _per_unit: the same divided by the units. The naive re-run costs one
                      block forward per unit, so no exact method can be much more than 1.4x faster than it
                      at the FLOP level: what is left is the batching
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import PRESETS, cpu_name, report, synchronize  # noqa: E402

from vl_masking.anatomy import ATTENTION_NAME, AttentionHook, attention_hook, register_attention  # noqa: E402
from vl_masking.encoder_knockout import measure_block  # noqa: E402


def build(args, device, dtype):
    """A random-weight Qwen3-VL with a tower of the chosen size (a small language model: it is not timed)."""
    from transformers import Qwen3VLForConditionalGeneration

    from vl_masking.tiny_models import qwen3_vl_config

    if args.preset:  # the preset's tower
        preset = PRESETS[args.preset]
        dims = dict(depth=preset["vision_depth"], hidden=preset["vision_hidden"], heads=preset["vision_heads"],
                    intermediate=preset["vision_intermediate"])
    else:  # Qwen-VL towers' MLPs are 4 x their width
        dims = dict(depth=args.depth, hidden=args.hidden, heads=args.heads,
                    intermediate=args.intermediate or 4 * args.hidden)
    config = qwen3_vl_config(layers=1, vision_depth=dims["depth"], vision_hidden=dims["hidden"],
                             vision_heads=dims["heads"], vision_intermediate=dims["intermediate"], deepstack=())
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).to(device, dtype).eval()
    side = args.image_size // 16
    grid = torch.tensor([[1, side, side]])
    pixels = torch.randn(side * side, 3 * 2 * 16 * 16, device=device, dtype=dtype)
    return model, {"pixel_values": pixels, "image_grid_thw": grid.to(device)}, dims


class MaskedSdpa(AttentionHook):
    """The naive re-run's attention: sdpa with the unit's keys masked out (a boolean mask per segment)."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        allowed = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device)
        allowed[:, self.hidden] = False
        return run_default(allowed[None, None])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--depth", type=int, default=4, help="vision blocks")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width (default 4 x hidden)")
    parser.add_argument("--image-size", type=int, default=224, help="square picture side in pixels (224 -> 196 "
                                                                    "patches, 49 language-model tokens)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--naive-samples", type=int, default=16, help="timed naive re-runs (their median counts)")
    parser.add_argument("--memory-budget-mb", type=int, default=256)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model, kwargs, dims = build(args, device, dtype)
    adapter_tower = __import__("vl_masking.models.qwen_vl", fromlist=["QwenVL"]).QwenVL(model.config, None, None)
    tower = adapter_tower.tower(model, kwargs, views=None)  # Qwen's tower reads its grid from the inputs
    units = [cells for cells in tower.cells[0]]  # every language-model token of the picture: 2x2 patches

    with torch.no_grad():
        tower.run(kwargs)  # warm-up
        rounds = []
        for _ in range(3):  # the fastest of three: a shared machine only ever adds time
            synchronize(device)
            started = time.perf_counter()
            tower.run(kwargs)
            synchronize(device)
            rounds.append(time.perf_counter() - started)
        tower_s = min(rounds)

        record = tower.record(kwargs)
        synchronize(device)
        started = time.perf_counter()
        for block in range(len(tower.blocks)):
            measure_block(tower, record, block, units, 2 + tower.num_heads, args.memory_budget_mb << 20)
        synchronize(device)
        encoder_s = time.perf_counter() - started

        register_attention()
        config = tower.module.config
        previous = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        draws = random.Random(0).sample([(b, u) for b in range(len(tower.blocks)) for u in range(len(units))],
                                        args.naive_samples)
        try:
            times = []
            for block, unit in draws:
                synchronize(device)
                started = time.perf_counter()
                with attention_hook(MaskedSdpa(units[unit].to(device))):
                    tower.blocks[block](record.inputs[block], **record.kwargs[block])
                synchronize(device)
                times.append(time.perf_counter() - started)
            per_rerun = statistics.median(times)
        finally:
            config._attn_implementation = previous
    naive_s = per_rerun * len(tower.blocks) * len(units)
    patches = int(kwargs["image_grid_thw"].prod())
    return report({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype),
            "model": args.preset or "custom", "tower": dims, "image_size": args.image_size, "patches": patches,
            "units": len(units), "blocks": len(tower.blocks), "tower_forward_s": round(tower_s, 4),
            "encoder_s": round(encoder_s, 4), "naive_s_extrapolated": round(naive_s, 4),
            "naive_samples": len(draws), "naive_over_encoder": round(naive_s / encoder_s, 2),
            "encoder_over_tower": round(encoder_s / tower_s, 1),
            "encoder_over_tower_per_unit": round(encoder_s / tower_s / len(units), 3)}, args.json)


if __name__ == "__main__":
    main()
