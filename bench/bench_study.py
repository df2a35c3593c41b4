"""Benchmark: a study's throughput, examples per hour, against the papers' method, in one run.

    python bench/bench_study.py --json bench/results/cpu_study_8L_h1024_512px_w9.json   # CPU mid case
    python bench/bench_study.py --layers 36 --flows "image->question,question->last"   # at a 4B model's depth

The CPU mid case of bench_engine.py (8 layers, hidden 1024, a 512 x 512 picture: 256 image tokens,
270 prompt tokens), --examples pictures and questions of the same shape, window 9, one step.

  ours_s_per_example        the flow analysis of one example (its generation and every window of the
                            flow), the median over the examples; "all" runs the three flows from one
                            generation, as a study with three --flow options does
  papers_s_per_example      one full forward pass per (window, source unit) of the flow, plus the
                            unblocked pass of the example, as Geva et al. and Zhang et al. run it: a
                            sample of configurations is timed (half of reference_flow's unblocked +
                            blocked pair: the model's own sdpa with the blocking mask) and multiplied
                            by the configurations of the example
  papers_at_plain_forward_s the same count of passes at the cost of a plain forward (sdpa, no mask):
                            the least the papers' method can cost
  examples_per_hour         3600 / the seconds per example, ours and the papers'
  speedup                   papers_s_per_example / ours_s_per_example (and at the plain forward's cost)
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import build_model, machine, model_arguments, report, timed  # noqa: E402
from vl_masking.analysis import analyse  # noqa: E402
from vl_masking.api import prepare  # noqa: E402
from vl_masking.options import RunSettings  # noqa: E402

FLOWS = ("units->last", "image->question", "question->last")
QUESTIONS = ("What colour is the square in the middle?", "What shape is the object on the left?",
             "Which animal is next to the small tree?", "What is the person in the picture holding?")


def example_inputs(loaded, tmp: Path, index: int, flows, args):
    image = tmp / f"example{index}.png"
    Image.effect_noise((args.image_size, args.image_size), 32 + 16 * index).convert("RGB").save(image)
    settings = RunSettings(model="random", prompt=QUESTIONS[index % len(QUESTIONS)], images=[str(image)],
                           num_tokens=1, mask_mode="both", device=args.device, dtype="float32", output_dir=str(tmp),
                           measure="flow", flows=tuple(flows), window=args.window)
    inputs, plan = prepare(loaded, settings)
    return settings, inputs, plan


def plain_forward_seconds(analysis) -> float:
    """One forward pass of the example's whole sequence through the model as it is (sdpa, no mask)."""
    from vl_masking.flow import step_forward_kwargs

    engine = analysis.measure.engine
    kwargs = step_forward_kwargs(engine, 0)
    inner = engine.loaded.model.model
    engine.loaded.model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    with torch.no_grad():
        inner(**kwargs, use_cache=False)
        return timed(lambda: inner(**kwargs, use_cache=False), engine.loaded.device, 3)[0]


def papers_seconds(analysis, samples: int) -> tuple:
    """(seconds per example, configurations) of one forward per (window, unit) of each flow, plus one
    unblocked forward; `samples` configurations per flow timed."""
    engine = analysis.measure.engine
    total, configurations = 0.0, 0
    single = None
    for pair_index, pair in enumerate(engine.flows.pairs):
        units = engine.flows.sources(pair, 0, engine.token_text)
        count = len(units) * len(engine.centres)
        times = []
        for i in range(min(samples, count)):
            unit, centre = i % len(units), engine.centres[(i * 3) % len(engine.centres)]
            seconds, _ = timed(lambda: engine.reference(0, pair_index, unit, centre), engine.loaded.device)
            times.append(seconds / 2)  # reference_flow runs the unblocked and the blocked pass
        single = statistics.median(times)
        total += single * count
        configurations += count
    return total + single, configurations  # + the example's one unblocked pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--samples", type=int, default=3, help="timed configurations of the papers' method per flow")
    parser.add_argument("--flows", default=",".join(FLOWS), help="comma-separated; each alone, then all together")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    loaded, dims = build_model(args, device, torch.float32)
    flows_measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        chosen = tuple(f.strip() for f in args.flows.split(",") if f.strip())
        for name, flows in [*((f, (f,)) for f in chosen), *([("all", chosen)] if len(chosen) > 1 else [])]:
            ours, papers, configurations = [], [], 0
            for index in range(args.examples):
                settings, inputs, plan = example_inputs(loaded, Path(tmp), index, flows, args)
                if index == 0:
                    analyse(loaded, inputs, plan, settings, progress=False)  # warm-up
                seconds, analysis = timed(lambda: analyse(loaded, inputs, plan, settings, progress=False), device)
                ours.append(seconds)
                if index == 0:  # the papers' cost per example depends on the units and windows only
                    papers_s, configurations = papers_seconds(analysis, args.samples)
                    plain_s = plain_forward_seconds(analysis) * (configurations + 1)
                papers.append(papers_s)
            ours_s, papers_s = statistics.median(ours), statistics.median(papers)
            flows_measured[name] = {
                "ours_s_per_example": round(ours_s, 3), "papers_s_per_example": round(papers_s, 2),
                "papers_at_plain_forward_s": round(plain_s, 2), "papers_configurations": configurations,
                "ours_examples_per_hour": round(3600 / ours_s, 1), "papers_examples_per_hour": round(3600 / papers_s, 2),
                "speedup": round(papers_s / ours_s, 1), "speedup_at_plain_forward": round(plain_s / ours_s, 1),
            }
            print(name, flows_measured[name], file=sys.stderr, flush=True)
    return report({**machine(device), "dtype": "float32", "dims": dims, "image_size": args.image_size,
                   "prompt_length": inputs.prompt_length, "window": args.window, "examples": args.examples,
                   "papers_samples_per_flow": args.samples, "flows": flows_measured}, args.json)


if __name__ == "__main__":
    main()
