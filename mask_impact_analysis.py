#!/usr/bin/env python
"""Which prompt tokens does each layer of a causal LM use? Mask each one and measure.

    python mask_impact_analysis.py --model Qwen/Qwen3-0.6B --prompt "The capital of France is" --num-tokens 5
    python mask_impact_analysis.py --config prompts_config.yaml [--resume]
"""

import sys

from vl_masking.api import run
from vl_masking.batch import run_batch
from vl_masking.console import cli_errors, summary
from vl_masking.options import parse_command_line


if __name__ == "__main__":
    with cli_errors():  # bad input: one line on stderr (a config: one per problem), exit 2
        request = parse_command_line(sys.argv[1:], kind="text")  # argparse + validation, before loading
        if request.batch is not None:  # every prompt of the config file, then the summary table
            sys.exit(run_batch(request.batch, vision_language=False, resume=request.resume))
        print(summary(run(request.settings, vision_language=False)))  # load, analyse, write; then the summary
