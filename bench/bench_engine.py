"""Benchmark: plain generate vs our analysis vs the reference method, in one run.

Random weights at a chosen size time the same as real ones. Prints one JSON object
(and writes it with --json PATH):

    python bench/bench_engine.py --layers 8 --hidden 1024 --image-size 512 --steps 3   # CPU case
    python bench/bench_engine.py --preset qwen3-vl-4b --image-size 1024 --device cuda   # GPU case

  generate_s        plain greedy `generate` (sdpa), same inputs and step count
  prefill_floor_s   generate + one full-sequence forward per step: the FLOP floor of the
                    analysis on a CPU (the N-row MLPs cost about one prefill per step)
  analysis_s        our analysis (all positions of --mask-mode, all variants)
  reference_s       the seed's method, L x (N + 1) layer re-runs per step: a sample of
                    re-runs is timed and extrapolated

With --measure flow (windowed attention knockout, one JSON with the three numbers):

    python bench/bench_engine.py --measure flow --window 3 --steps 1   # CPU mid case

  flow_analysis_s   our flow analysis: generation plus the batched windows
  flow_floor_s      one forward of (units x windows) rows through the layers each window
                    needs (its first layer to the last), attending over the step's cached
                    keys with plain sdpa and nothing blocked, then the final norm and the LM
                    head (the KL needs every logit): the work the rows cannot avoid
  reference_s       one full forward pass per (unit, window, step), as the papers do: a
                    sample is timed and extrapolated

With --measure attention (the last query's attention on each unit, from the unblocked pass):

    python bench/bench_engine.py --measure attention --steps 3   # CPU case

    python bench/bench_engine.py --measure attention --attention-variants Mean,Block,Heads

  generate_s                  plain greedy `generate` (sdpa), same inputs and step count
  attention_analysis_s        the attention measure: generation plus every unit's weights and norms
  attention_over_generate     the median of their ratios over --repeats rounds (the target: at
                              most 1.1), and its _quartiles
  first_run_over_generate     the same for runs that also make the heads' Gram matrices, which
                              later runs with the same loaded model reuse (a single command's run)
  attention_work_s            the measure's own work in a run, timed inside it: its layer hook, the
                              attention hook around the model's own attention, and everything the
                              analysis does after generate
  *_work_over_generate        1 + work / generate, the median over the rounds: far steadier on a
                              shared machine than a ratio of two end-to-end times (CPU only: on a
                              GPU the hooks' seconds are not their kernels')
  rounds_s                    every round's seconds
  memory_*_bytes              the peak memory of a process that builds the model and runs generate,
                              or the attention measure, twice (Linux VmHWM; on CUDA the peak
                              allocated memory), each in a fresh process, and their ratio
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vl_masking.analysis import analyse  # noqa: E402
from vl_masking.api import prepare  # noqa: E402
from vl_masking.anatomy import decoder_layers  # noqa: E402
from vl_masking.inputs import LoadedModel, load_image_processor, to_device  # noqa: E402
from vl_masking.options import TOOLS, RunSettings, option_default, option_fields  # noqa: E402
from vl_masking.reference import base_allowed, reference_variants  # noqa: E402
from vl_masking.tiny_models import (TOKENIZER_DIR, VL_CHAT_TEMPLATE, image_processor_config,  # noqa: E402
                                    qwen3_vl_config)

PRESETS = {
    # Qwen3-VL-4B-Instruct's text decoder and vision tower dimensions
    "qwen3-vl-4b": dict(layers=36, hidden=2560, heads=32, kv_heads=8, head_dim=128, intermediate=9728,
                        vision_depth=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
                        deepstack=(5, 11, 17)),
    "qwen3-vl-30b-a3b": dict(layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, intermediate=768 * 2,
                             vision_depth=27, vision_hidden=1152, vision_heads=16, vision_intermediate=4304,
                             deepstack=(8, 16, 24), moe_experts=128, experts_per_token=8),
}


RUN_FIELDS = {f.name: f for f in option_fields()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=1):
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def model_arguments(parser) -> None:
    """The random-weight model's dimensions and the picture's size (build_model reads them)."""
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width (default 3 x hidden)")
    parser.add_argument("--moe-experts", type=int, default=0, help="mixture-of-experts MLPs with this many experts")
    parser.add_argument("--experts-per-token", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2, help="vision blocks")
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-heads", type=int, default=4)
    parser.add_argument("--vision-intermediate", type=int, default=0, help="the tower's MLP width (default 2 x its "
                                                                           "width)")
    parser.add_argument("--deepstack", default="0,1", help="the vision blocks DeepStack taps, comma-separated")
    parser.add_argument("--image-size", type=int, default=512, help="square image side in pixels (512 -> 256 tokens)")
    parser.add_argument("--video-frames", type=int, default=0,
                        help="a video of this many frames of --image-size pixels instead of the image, at the family's "
                             "default video resolution (Qwen3-VL: 16 frames of 512 px -> 192 px, 8 x 36 tokens)")


def build_model(args, device, dtype):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    dims = dict(PRESETS[args.preset]) if args.preset else dict(
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        intermediate=args.intermediate or 3 * args.hidden, vision_depth=args.vision_depth,
        vision_hidden=args.vision_hidden, vision_heads=args.vision_heads, vision_intermediate=args.vision_intermediate,
        deepstack=tuple(int(b) for b in args.deepstack.split(",") if b), moe_experts=args.moe_experts,
        experts_per_token=args.experts_per_token)
    torch.manual_seed(0)
    config = qwen3_vl_config(**dims)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = VL_CHAT_TEMPLATE.read_text(encoding="utf-8")  # as a Qwen3-VL checkpoint has
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "preprocessor_config.json").write_text(json.dumps(image_processor_config()))
        image_processor = load_image_processor(tmp, remote=False)
    loaded = LoadedModel(tokenizer=tokenizer, image_processor=image_processor, config=config, name="random",
                         tool="vl", model=model, device=device, dtype=dtype)
    return loaded, dims


def reference_seconds(loaded, analysis, inputs, samples):
    """Time `samples` reference re-runs per step on the real captured layer inputs; extrapolate."""
    capture = analysis.capture
    meta = analysis.metadata
    layers = decoder_layers(loaded.model)
    total = 0.0
    measured = 0
    for step in range(meta["steps"]):
        length = meta["prompt_length"] + step
        n_masked = meta["units_per_step"][step]
        allowed = base_allowed(length, capture.vision_blocks, None, loaded.device)  # Qwen3-VL: no sliding window
        per_layer = []
        for i in range(samples):
            layer = (i * 7) % len(layers)
            hidden, pe = capture.sequence_input(layer, step)
            seconds, _ = timed(lambda: reference_variants(loaded.model, layer, hidden, pe, allowed, hide=[i]),
                               loaded.device)
            per_layer.append(seconds)
            measured += 1
        total += statistics.median(per_layer) * len(layers) * (n_masked + 1)
    return total, measured


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mask-mode", default="both")
    parser.add_argument("--mask-unit", default="token", help="token, word, image or region:RxC")
    parser.add_argument("--vision-attention", default="bidirectional", choices=("bidirectional", "causal"),
                        help="causal: the model's own attention, the computation plain generate does")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-samples", type=int, default=4, help="timed reference re-runs per step")
    parser.add_argument("--measure", default="layer", choices=("layer", "flow", "attention"))
    parser.add_argument("--window", type=int, default=9, help="with --measure flow")
    parser.add_argument("--flow", default="units->last", help="with --measure flow")
    parser.add_argument("--attention-variants", default=option_default(RUN_FIELDS["attention_variants"], TOOLS["vl"]),
                        help="with --measure attention")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--memory-of", choices=("generate", "analysis"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(
        torch, args.dtype)
    loaded, dims = build_model(args, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        image_path = Path(tmp) / "bench.png"
        Image.effect_noise((args.image_size, args.image_size), 64).convert("RGB").save(image_path)
        media = {"images": [str(image_path)]}
        if args.video_frames:  # a folder of frames, every frame sampled (a folder's assumed 24 frames per second)
            frames = Path(tmp) / "frames"
            frames.mkdir()
            for k in range(args.video_frames):
                Image.effect_noise((args.image_size, args.image_size), 64 + k).convert("RGB").save(
                    frames / f"frame{k:03d}.png")
            media = {"videos": [str(frames)], "fps": 24.0, "max_frames": args.video_frames}
        settings = RunSettings(model="random", prompt="Describe this image.", **media,
                               num_tokens=args.steps, mask_mode=args.mask_mode, device=args.device,
                               dtype=str(dtype).replace("torch.", ""), output_dir=tmp, measure=args.measure,
                               mask_unit=args.mask_unit, vision_attention=args.vision_attention,
                               flows=(args.flow,) if args.measure == "flow" else (), window=args.window,
                               attention_variants=tuple(args.attention_variants.split(",")))
        inputs, plan = prepare(loaded, settings)
    model, kwargs = loaded.model, to_device(inputs, loaded)

    def generate():
        with torch.no_grad():
            return model.generate(**kwargs, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False)

    if args.memory_of:
        return memory_child(args, generate, lambda: analyse(loaded, inputs, plan, settings, progress=False))
    if args.measure == "flow":
        return finish(args, bench_flow(args, loaded, inputs, plan, settings, device), loaded, dims, dtype, device)
    if args.measure == "attention":
        return finish(args, bench_attention(args, argv, loaded, inputs, plan, settings, device, generate), loaded,
                      dims, dtype, device)

    def full_prefills(sequence):
        prompt_len = kwargs["input_ids"].shape[1]
        with torch.no_grad():
            for step in range(args.steps):
                ids = sequence[:, : prompt_len + step]
                mm = torch.zeros_like(ids)
                mm[:, :prompt_len] = kwargs["mm_token_type_ids"]
                pictures = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask",
                                                                         "mm_token_type_ids")}
                model(input_ids=ids, attention_mask=torch.ones_like(ids), **pictures, mm_token_type_ids=mm,
                      use_cache=False, logits_to_keep=1)

    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    timed(generate, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generate_s, sequence = timed(generate, device, args.repeats)
    generate_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    prefills_s, _ = timed(lambda: full_prefills(sequence), device, args.repeats)

    analysis_s, analysis, analysis_peak = timed_analysis(loaded, inputs, plan, settings, device, args.repeats)
    kept = analyse(loaded, inputs, plan, replace(settings, check=1), progress=False)  # keeps the layer inputs
    reference_s, sampled = reference_seconds(loaded, kept, inputs, args.reference_samples)

    meta = analysis.metadata
    floor = generate_s + prefills_s
    return finish(args, {
        **run_fields(args, meta), "mask_unit": args.mask_unit, "rows": len(analysis.table),
        "generate_s": round(generate_s, 4),
        "prefill_floor_s": round(floor, 4),
        "analysis_s": round(analysis_s, 4),
        "reference_s_extrapolated": round(reference_s, 2),
        "reference_runs_timed": sampled,
        "analysis_over_generate": round(analysis_s / generate_s, 2),
        "analysis_over_floor": round(analysis_s / floor, 2),
        "reference_over_analysis": round(reference_s / analysis_s, 1),
        "peak_memory_generate_bytes": generate_peak,
        "peak_memory_analysis_bytes": analysis_peak,
        "peak_memory_analysis_over_generate": round(analysis_peak / generate_peak, 3) if generate_peak else None,
    }, loaded, dims, dtype, device)


def timed_analysis(loaded, inputs, plan, settings, device, repeats) -> tuple:
    """(median seconds, the analysis, peak CUDA memory or None) of our analysis, after a warm-up run."""
    def run_analysis():
        return analyse(loaded, inputs, plan, settings, progress=False)

    run_analysis()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, analysis = timed(run_analysis, device, repeats)
    return seconds, analysis, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_fields(args, meta: dict) -> dict:
    """What both measures report about the run itself."""
    return {"steps": meta["steps"], "prompt_length": meta["prompt_length"],
            "vision_tokens": sum(i["token_end"] - i["token_start"] for i in meta["images"]),
            "mask_mode": args.mask_mode, "units_per_step": meta["units_per_step"]}


def finish(args, measured: dict, loaded, dims, dtype, device) -> dict:
    """The machine and the model, then the measured numbers; printed and written as JSON."""
    return report({
        **machine(device), "dtype": str(dtype).replace("torch.", ""), "model": args.preset or "custom", "dims": dims,
        "image_size": args.image_size, "video_frames": args.video_frames, "measure": args.measure, **measured,
    }, args.json)


def machine(device) -> dict:
    """What a result was measured on: the device, its threads and the library versions."""
    import transformers

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def report(result: dict, json_path) -> dict:
    """Print the result as JSON and, with --json PATH, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
    return result


def bench_flow(args, loaded, inputs, plan, settings, device) -> dict:
    """Our flow analysis, its floor and the one-forward-per-configuration reference, in one run."""
    from vl_masking.anatomy import AttentionHook, attention_hook, text_model

    analysis_s, analysis, peak = timed_analysis(loaded, inputs, plan, settings, device, args.repeats)
    measure, meta = analysis.measure.engine, analysis.metadata
    capture = analysis.capture
    layers = text_model(loaded.model).layers
    windows = sorted(set(measure.windows.values()), key=lambda w: (w.start, w.end))

    class PlainRows(AttentionHook):
        """Rows attending over the step's cached keys plus their own, plain sdpa, nothing blocked."""

        def __init__(self, step):
            self.step = step

        def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
            keys, values = capture.keys_values(module.layer_idx, self.step)
            n = query.shape[0]
            k = torch.cat([keys[None, :, :-1].expand(n, -1, -1, -1), key], dim=2)
            v = torch.cat([values[None, :, :-1].expand(n, -1, -1, -1), value], dim=2)
            out = torch.nn.functional.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True)
            return out.transpose(1, 2)

    def floor():
        with torch.no_grad():
            for step in range(meta["steps"]):
                units = len(measure.flows.sources(measure.flows.pairs[0], step))
                with attention_hook(PlainRows(step)):
                    for window in windows:
                        hidden, (cos, sin) = capture.sequence_input(window.start, step)
                        x = hidden[:, -1:].expand(units, -1, -1).contiguous()
                        for index in range(window.start, len(layers)):
                            _, (cos, sin) = capture.sequence_input(index, step)
                            x = layers[index](x, attention_mask=None, position_embeddings=(cos[..., -1:, :],
                                                                                           sin[..., -1:, :]))
                        loaded.model.get_output_embeddings()(text_model(loaded.model).norm(x))

    floor()  # warm-up
    floor_s, _ = timed(floor, device, args.repeats)
    # The reference: one full forward pass per configuration; time a sample, extrapolate.
    configurations = sum(len(measure.flows.sources(measure.flows.pairs[0], s)) for s in range(meta["steps"])) * len(windows)
    samples = []
    for i in range(args.reference_samples):
        step = i % meta["steps"]
        centre = measure.centres[i % len(measure.centres)]
        seconds, _ = timed(lambda: measure.reference(step, 0, i, centre), device)
        samples.append(seconds)
    reference_s = statistics.median(samples) * configurations
    rows = [window.start for window in windows]
    return {
        **run_fields(args, meta), "flow": args.flow, "window": args.window, "windows": len(windows),
        "row_layers_per_unit": sum(len(layers) - start for start in rows),
        "rows": len(analysis.table),
        "flow_analysis_s": round(analysis_s, 4),
        "flow_floor_s": round(floor_s, 4),
        "reference_s_extrapolated": round(reference_s, 2),
        "reference_runs_timed": len(samples),
        "reference_configurations": configurations,
        "analysis_over_floor": round(analysis_s / floor_s, 2),
        "reference_over_analysis": round(reference_s / analysis_s, 1),
        "peak_memory_analysis_bytes": peak,
    }


def bench_attention(args, argv, loaded, inputs, plan, settings, device, generate) -> dict:
    """Plain generate against the attention measure: time in this process, memory each in a fresh one."""
    from unittest import mock

    from vl_masking import anatomy
    from vl_masking.capture import Capture
    from vl_masking.measures.attention import AttentionMeasure

    spent = {}

    def timing(owner, name):
        """Patch owner.name to add its seconds to spent[name]."""
        inner = getattr(owner, name)

        def timed_call(*a, **k):
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
        return mock.patch.object(owner, name, timed_call)

    def run_analysis():
        """The analysis, with its seconds inside generate, the measure's layer hook, the Capture's attention hook
        and the model's own attention in it recorded in `spent`."""
        spent.update(generate=0.0, on_layer=0.0, attend=0.0, sdpa_attention_forward=0.0)
        with timing(model, "generate"), timing(AttentionMeasure, "on_layer"), timing(Capture, "attend"), \
                timing(anatomy, "sdpa_attention_forward"):
            return analyse(loaded, inputs, plan, settings, progress=False)

    def work(total):
        """The seconds of the last run of `total` seconds that plain generate does not spend: all but generate,
        the measure's layer hook, and the Capture's attention hook around the model's own attention."""
        hooks = spent["on_layer"] + spent["attend"] - spent["sdpa_attention_forward"]
        return total - spent["generate"] + hooks

    def plain():
        model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
        return generate()

    def first_run():
        loaded.head_grams.clear()  # as in a fresh process: the run makes the heads' Gram matrices too
        return run_analysis()

    model = loaded.model
    plain(), run_analysis()  # warm-up
    # Interleaved, so that a slow stretch of a busy machine falls on both alike, and in alternating order
    # (generate first in one round, last in the next), so that neither always runs after the other. Each round
    # gives a ratio; the median of the ratios is the result, their quartiles its spread. On a shared machine one
    # run's time varies by 20% or more and the margin sought is a few percent, so the measure's own work (its
    # layer hook, the attention hook around the model's attention, all the analysis does after generate) is
    # also timed inside each run, where that spread scales only the work itself. The ratio of the fastest runs
    # of each kind (timeit's rule: the fastest run is the one the machine disturbed least) is a third estimate,
    # one that holds on CUDA too.
    runs = {"generate": plain, "analysis": run_analysis, "first": first_run}
    rounds = []
    for i in range(args.repeats):
        kinds = ("generate", "analysis", "first") if i % 2 == 0 else ("first", "analysis", "generate")
        seconds = {}
        for kind in kinds:
            seconds[kind], result = timed(runs[kind], device)
            if kind != "generate":
                seconds[kind + "_work"] = work(seconds[kind])
            if kind == "analysis":
                analysis = result
        rounds.append(seconds)

    def ratios(kind):
        return [r[kind] / r["generate"] for r in rounds]

    def median(values):
        return round(statistics.median(values), 3)

    def fastest(kind):
        return round(min(r[kind] for r in rounds) / min(r["generate"] for r in rounds), 3)

    quartiles = statistics.quantiles(ratios("analysis"), n=4) if len(rounds) > 1 else [ratios("analysis")[0]] * 3
    memory = {what: memory_in_child(argv, what) for what in ("generate", "analysis")}
    return {
        **run_fields(args, analysis.metadata), "mask_unit": args.mask_unit, "rows": len(analysis.table),
        "vision_attention": args.vision_attention, "attention_variants": args.attention_variants,
        "generate_s": median(r["generate"] for r in rounds),
        "attention_analysis_s": median(r["analysis"] for r in rounds),
        "attention_over_generate": median(ratios("analysis")),
        "attention_over_generate_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "first_run_over_generate": median(ratios("first")),
        "attention_fastest_over_generate": fastest("analysis"),
        "first_run_fastest_over_generate": fastest("first"),
        **({} if device.type == "cuda" else {  # kernels run asynchronously: a hook's seconds are not its work
            "attention_work_s": median(r["analysis_work"] for r in rounds),
            "attention_work_over_generate": median(1 + x for x in ratios("analysis_work")),
            "first_run_work_over_generate": median(1 + x for x in ratios("first_work"))}),
        "rounds_s": [{k: round(v, 4) for k, v in r.items()} for r in rounds],
        "repeats": args.repeats,
        "memory_generate_bytes": memory["generate"], "memory_attention_bytes": memory["analysis"],
        "memory_attention_over_generate": round(memory["analysis"] / memory["generate"], 3),
    }


def memory_in_child(argv, what: str) -> int:
    """The peak memory of a process that builds the model and runs `what` twice, measured in a new process (the
    peak of this one is spoiled by earlier runs)."""
    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    if "--json" in argv:
        at = argv.index("--json")
        del argv[at: at + 2]
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", what], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def status_kb(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])


def memory_child(args, generate, analysis) -> dict:
    """In a child: the peak memory of the process (the model included) over two runs of one kind."""
    device = torch.device(args.device)
    run = generate if args.memory_of == "generate" else analysis
    run()
    run()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = status_kb("VmHWM") * 1024  # Linux: the process's peak resident size
    print(json.dumps({"peak_bytes": peak}))
    return {"peak_bytes": peak}


if __name__ == "__main__":
    main()
