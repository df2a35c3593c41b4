#!/usr/bin/env python
"""Which prompt tokens does each layer of a causal LM use? Mask each one and measure.

    python mask_impact_analysis.py --model Qwen/Qwen3-0.6B --prompt "The capital of France is" --num-tokens 5
"""

import sys

from vl_masking.api import run
from vl_masking.console import cli_errors, summary
from vl_masking.options import parse_settings


if __name__ == "__main__":
    with cli_errors():  # bad input: one line on stderr, exit 2
        settings = parse_settings(sys.argv[1:], kind="text")  # argparse + validation, before loading
        print(summary(run(settings, vision_language=False)))  # load, analyse, write; then the summary
