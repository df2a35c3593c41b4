#!/usr/bin/env python
"""Which prompt tokens does each layer of a causal LM use? Mask each one and measure.

    python mask_impact_analysis.py --model Qwen/Qwen3-0.6B --prompt "The capital of France is" --num-tokens 5
"""

import sys

from vl_masking.api import run
from vl_masking.console import cli_errors, summary
from vl_masking.options import parse_settings


def main(argv=None):
    with cli_errors():
        settings = parse_settings(argv, kind="text")
        result = run(settings, vision_language=False)
        print(summary(result))


if __name__ == "__main__":
    sys.exit(main())
