#!/usr/bin/env python
"""Which prompt tokens does each layer of a causal LM use? Hide each one and measure.

    python mask_impact_analysis.py --model Qwen/Qwen3-0.6B --prompt "The capital of France is" --num-tokens 5
    python mask_impact_analysis.py --config prompts_config.yaml [--resume]
"""

from vl_masking.cli import main
from vl_masking.tools import TEXT

if __name__ == "__main__":
    main(TEXT)  # argparse + validation before torch is imported; bad input: one line, exit 2
