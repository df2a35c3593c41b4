"""The two tools, each described once: its defaults, whether it takes images, how it frames the prompt.

Every place that differs between `mask_impact_vl.py` and `mask_impact_analysis.py` (the
argument parser, the Python API, loading, prompt building, batch configs) reads it from here.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Tool:
    name: str  # "vl" or "text": the key in TOOLS, stored in RunSettings.tool
    script: str
    default_model: str
    default_output: str
    default_vision_attention: str
    takes_images: bool
    # "always": the prompt is always a chat turn (the checkpoint's template, else the family's built-in
    # format); "optional": raw text unless --chat asks for the tokenizer's template.
    chat: str
    model_class: str  # the transformers auto class that loads its checkpoints

    @property
    def default_chat(self) -> bool:
        return self.chat == "always"


VL = Tool(name="vl", script="mask_impact_vl.py", default_model="Qwen/Qwen3-VL-4B-Instruct",
          default_output="vl_masking_results", default_vision_attention="bidirectional", takes_images=True,
          chat="always", model_class="AutoModelForImageTextToText")
TEXT = Tool(name="text", script="mask_impact_analysis.py", default_model="Qwen/Qwen3-0.6B",
            default_output="masking_results", default_vision_attention="causal", takes_images=False,
            chat="optional", model_class="AutoModelForCausalLM")
TOOLS = {tool.name: tool for tool in (VL, TEXT)}
