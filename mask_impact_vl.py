#!/usr/bin/env python
"""Which prompt tokens does each layer of a vision-language model use (Qwen-VL, LLaVA, Gemma 3, InternVL, Idefics3,
SmolVLM; docs/models.md)? Hide each one and measure.

    python mask_impact_vl.py --model Qwen/Qwen3-VL-4B-Instruct --image photo.jpg \
        --prompt "What is in this image?" --num-tokens 3 --mask-mode vision
    python mask_impact_vl.py --config prompts_config_vl.yaml [--resume]
"""

from vl_masking.cli import main
from vl_masking.tools import VL

if __name__ == "__main__":
    main(VL)  # argparse + validation before torch is imported; bad input: one line, exit 2
