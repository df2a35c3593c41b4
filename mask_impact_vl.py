#!/usr/bin/env python
"""Which prompt tokens does each layer of a Qwen3-VL model use? Mask each one and measure.

    python mask_impact_vl.py --model Qwen/Qwen3-VL-4B-Instruct --image photo.jpg \
        --prompt "What is in this image?" --num-tokens 3 --mask-mode vision
"""

import sys

from vl_masking.api import run
from vl_masking.console import cli_errors, summary
from vl_masking.options import parse_settings


def main(argv=None):
    with cli_errors():
        settings = parse_settings(argv, kind="vl")
        result = run(settings, vision_language=True)
        print(summary(result))


if __name__ == "__main__":
    sys.exit(main())
