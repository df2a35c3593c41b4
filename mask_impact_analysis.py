#!/usr/bin/env python
"""Which prompt tokens does each layer of a causal LM use? Hide each one and measure.

    python mask_impact_analysis.py --model Qwen/Qwen3-0.6B --prompt "The capital of France is" --num-tokens 5
    python mask_impact_analysis.py --config prompts_config.yaml [--resume]
"""

import sys

from vl_masking.cli import parse_command_line, run, run_batch
from vl_masking.console import cli_errors, summary
from vl_masking.tools import TEXT

if __name__ == "__main__":
    with cli_errors():  # bad input: one line on stderr, exit 2; Ctrl-C / SIGTERM: no partial file, exit 130 / 143
        request = parse_command_line(sys.argv[1:], TEXT)  # argparse + validation, before torch is imported
        if request.batch is not None:  # every prompt of the config file, then the summary table
            sys.exit(run_batch(request.batch, resume=request.resume))
        print(summary(run(request.settings)))  # load, analyse, write; then the summary
