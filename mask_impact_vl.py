#!/usr/bin/env python
"""Which prompt tokens does each layer of a Qwen3-VL model use? Mask each one and measure.

    python mask_impact_vl.py --model Qwen/Qwen3-VL-4B-Instruct --image photo.jpg \
        --prompt "What is in this image?" --num-tokens 3 --mask-mode vision
    python mask_impact_vl.py --config prompts_config_vl.yaml [--resume]
"""

import sys

from vl_masking.api import run
from vl_masking.batch import run_batch
from vl_masking.console import cli_errors, summary
from vl_masking.options import parse_command_line


if __name__ == "__main__":
    with cli_errors():  # bad input: one line on stderr (a config: one per problem), exit 2
        request = parse_command_line(sys.argv[1:], kind="vl")  # argparse + validation, before loading
        if request.batch is not None:  # every prompt of the config file, then the summary table
            sys.exit(run_batch(request.batch, vision_language=True, resume=request.resume))
        print(summary(run(request.settings, vision_language=True)))  # load, analyse, write; then the summary
