"""Benchmark of the encoder-flow measure (a picture unit hidden in a window of vision blocks, read at the prediction)
against the naive method, one full forward of the model per (unit, window), on a random-weight Qwen3-VL. Prints
one JSON object (and writes it with --json PATH):

    python bench/bench_encoder_flow.py                                                  # CPU mid case
    python bench/bench_encoder_flow.py --preset qwen3-vl-4b --image-size 448 --device cuda    # GPU case

The CPU mid case: the layer bench's language model (8 layers, hidden 1024) under a ViT-B-sized tower (12 blocks,
hidden 768, MLP 3072, DeepStack taps after blocks 2, 5 and 8), a 224x224 picture (196 patches, 49 image tokens),
2x2 regions (16 units), windows of 3 blocks: 16 x (12 windows + 2 after-projector series) = 224 configurations.

  forward_s               one forward of the whole model on the prompt (sdpa, logits at the last position), the
                          fastest of five
  tower_forward_s         one forward of the tower alone, the fastest of five timed in alternation with those;
                          tower_share: its part of forward_s
  encoder_flow_s          the measure as a run does it: the generation of the first token, the recorded tower
                          pass, every (window, unit) knockout and the two after-projector series, batched
  no_prefix_reuse_s       the same with the blocks before each window run again in every batch (batching alone)
  naive_s_extrapolated    one full forward per configuration (the unit's patches hidden from the window's blocks by
                          sdpa with a boolean key mask; the language model's prompt attention as the run's): a
                          sample timed one by one, the median times the configurations
  reuse_largest_difference  the largest difference of prob, delta_logprob or KL between the two runs: the
                          replayed prefix is the single-copy pass's, the recomputed one a batch's (float rounding)
  naive_at_plain_forward_cost_s  the configurations times forward_s: the naive method if its masks cost nothing
                          (the conservative comparison); plain_forwards_over_encoder_flow its ratio
  prefix_share            the mean over the windows of (first block / blocks): the part of the tower the reuse skips
  flop_bound              naive_s over the least an engine that skips only the prefix can do: every
                          configuration one forward, less the blocks before the window for a knockout and the
                          whole tower for a unit replaced after the projector (timed as tower_forward_s). Nothing
                          else is the same between two configurations: a hidden key moves every query of its
                          picture from the window on, so the rest of the tower, the projector and the language
                          model's prefill from the first image token on run again for each. Batching adds what
                          a device gains from larger matrices (little on a CPU, whose cores a single forward
                          already fills)
"""

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import build_model, machine, model_arguments, report, synchronize  # noqa: E402

import vl_masking.encoder_flow as engine  # noqa: E402
from vl_masking.analysis import analyse  # noqa: E402
from vl_masking.anatomy import ATTENTION_NAME, attention_hook, register_attention  # noqa: E402
from vl_masking.api import prepare  # noqa: E402
from vl_masking.inputs import to_device  # noqa: E402
from vl_masking.options import RunSettings  # noqa: E402


class NaiveWindow(engine.PromptAttention):
    """One configuration of the naive method: the window's vision blocks attend through sdpa with the unit's
    patches masked out as keys (one picture: one segment); everything else as the run attends."""

    def __init__(self, blocks, tower, window: set, hidden: torch.Tensor):
        super().__init__(blocks)
        self.block_of = {id(b.get_submodule(tower.anatomy.attention)): i for i, b in enumerate(tower.blocks)}
        self.window, self.hidden = window, hidden

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        block = self.block_of.get(id(module))
        if block is None:
            return super().attend(module, query, key, value, attention_mask, scaling, sliding_window, run_default)
        if block not in self.window:
            return run_default(attention_mask)
        allowed = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device)
        allowed[:, self.hidden.to(query.device)] = False
        return run_default(allowed[None, None])


def fastest(fns: list, device, rounds=5) -> list:
    """Each function's fastest of `rounds` timed calls, in alternation after a warm-up: a shared machine only ever
    adds time, and a slow spell then slows both alike."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(rounds):
        for fn, kept in zip(fns, times):
            synchronize(device)
            started = time.perf_counter()
            fn()
            synchronize(device)
            kept.append(time.perf_counter() - started)
    return [min(kept) for kept in times]


def timed_once(fn, device) -> tuple:
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - started, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.set_defaults(vision_depth=12, vision_hidden=768, vision_heads=12, vision_intermediate=3072,
                        deepstack="2,5,8", image_size=224)
    parser.add_argument("--mask-unit", default="region:2x2", help="the picture units (token, region:RxC, ...)")
    parser.add_argument("--encoder-window", type=int, default=3, help="vision blocks hidden around each block")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--naive-samples", type=int, default=12, help="timed naive forwards (their median counts)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    loaded, dims = build_model(args, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        picture = Path(tmp) / "bench.png"
        Image.effect_noise((args.image_size, args.image_size), 64).convert("RGB").save(picture)
        settings = RunSettings(model="random", prompt="Describe this image.", images=[str(picture)], num_tokens=1,
                               mask_mode="vision", mask_unit=args.mask_unit, measure=("encoder-flow",),
                               encoder_window=args.encoder_window, device=args.device,
                               dtype=str(dtype).replace("torch.", ""), output_dir=tmp)
        inputs, plan = prepare(loaded, settings)
    model, kwargs = loaded.model, to_device(inputs, loaded)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})

    def run():
        return analyse(loaded, inputs, plan, settings, progress=False)

    def without_reuse():
        with mock.patch.object(engine, "replayed_prefix", lambda *a: contextlib.nullcontext()):
            return run()

    with torch.no_grad():
        encoder_flow_s, analysis = timed_once(run, device)
        measure = analysis.measure
        tower = measure.tower
        knockouts = [(start, end) for code, _, start, end, _ in measure.results if code == 0]
        configurations = len(measure.units) * len(measure.results)
        draws = random.Random(0).sample([(w, u) for w in range(len(knockouts)) for u in range(len(measure.units))],
                                        min(args.naive_samples, len(knockouts) * len(measure.units)))
        register_attention()
        config, previous = tower.module.config, tower.module.config._attn_implementation

        def naive(draws) -> list:
            """Seconds of one full forward for each (window, unit) drawn."""
            times = []
            try:
                config._attn_implementation = ATTENTION_NAME
                for w, u in draws:
                    start, end = knockouts[w]
                    hook = NaiveWindow(measure.decoder_blocks, tower, set(range(start, end + 1)), measure.cells[u])
                    with attention_hook(hook):
                        seconds, _ = timed_once(lambda: model(**kwargs, use_cache=False, logits_to_keep=1), device)
                    times.append(seconds)
            finally:
                config._attn_implementation = previous
            return times

        # the naive forwards half between the two runs, half after: a slow spell of the machine weighs on both
        times = naive(draws[:len(draws) // 2])
        no_reuse_s, plain = timed_once(without_reuse, device)
        times += naive(draws[len(draws) // 2:])
        forward_s, tower_s = fastest([lambda: model(**kwargs, use_cache=False, logits_to_keep=1),
                                      lambda: tower.run(kwargs)], device)
        moved = max(float((torch.as_tensor(a[4][k]).double() - torch.as_tensor(b[4][k]).double()).abs().max())
                    for a, b in zip(measure.results, plain.measure.results) for k in ("prob", "delta_logprob", "kl"))
    naive_s = statistics.median(times) * configurations
    depth = len(tower.blocks)
    prefix_share = statistics.mean(start / depth for start, _ in knockouts)
    units = len(measure.units)
    least = units * sum(forward_s - start / depth * tower_s for start, _ in knockouts) + \
        units * (len(measure.results) - len(knockouts)) * (forward_s - tower_s)
    return report({
        **machine(device), "dtype": str(dtype).replace("torch.", ""), "model": args.preset or "custom", "dims": dims,
        "image_size": args.image_size, "mask_unit": args.mask_unit, "image_tokens": len(tower.cells[0]),
        "patches": int(sum(len(c) for c in tower.cells[0])), "units": units, "vision_blocks": depth,
        "encoder_window": args.encoder_window, "windows": len(knockouts), "configurations": configurations,
        "rows": len(analysis.table), "forward_s": round(forward_s, 4), "tower_forward_s": round(tower_s, 4),
        "tower_share": round(tower_s / forward_s, 3), "encoder_flow_s": round(encoder_flow_s, 3),
        "no_prefix_reuse_s": round(no_reuse_s, 3), "reuse_largest_difference": moved,
        "naive_s_extrapolated": round(naive_s, 2), "naive_forwards_timed": len(times),
        "naive_forward_median_s": round(statistics.median(times), 4),
        "naive_over_encoder_flow": round(naive_s / encoder_flow_s, 2),
        "naive_over_no_prefix_reuse": round(naive_s / no_reuse_s, 2),
        "naive_at_plain_forward_cost_s": round(configurations * forward_s, 2),
        "plain_forwards_over_encoder_flow": round(configurations * forward_s / encoder_flow_s, 2),
        "prefix_share": round(prefix_share, 3), "flop_bound": round(configurations * forward_s / least, 2)},
        args.json)


if __name__ == "__main__":
    main()
