#!/usr/bin/env python
"""Which prompt tokens does each layer of a Qwen3-VL model use? Mask each one and measure.

    python mask_impact_vl.py --model Qwen/Qwen3-VL-4B-Instruct --image photo.jpg \
        --prompt "What is in this image?" --num-tokens 3 --mask-mode vision
"""

import sys

from vl_masking.api import run
from vl_masking.console import cli_errors, summary
from vl_masking.options import parse_settings


if __name__ == "__main__":
    with cli_errors():  # bad input: one line on stderr, exit 2
        settings = parse_settings(sys.argv[1:], kind="vl")  # argparse + validation, before loading
        print(summary(run(settings, vision_language=True)))  # load, analyse, write; then the summary
