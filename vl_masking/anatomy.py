"""Model anatomy shared by the engines and the reference: where the text decoder's layers are, and the one
attention hook mechanism through which every decoder layer's attention runs.

The function registered as "mask_impact" (transformers' AttentionInterface) runs the model's
normal attention (sdpa) unless an AttentionHook is in use, which then decides what the attention
of that call is. No model class is patched; with no hook in use the function is plain sdpa. The
engines (capture.Capture, flow.RowAttention) and the reference (reference.LayerMasks) are hooks;
this module knows nothing of either.
"""

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import UnsupportedModelError

ATTENTION_NAME = "mask_impact"
_hook = None  # the AttentionHook in use, if any


class AttentionHook:
    """Decides one attention call of a decoder layer; run_default(mask) is sdpa with that mask."""

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        return run_default(attention_mask)


@contextmanager
def attention_hook(hook: AttentionHook):
    """Use `hook` for every mask_impact attention call inside the block (one hook at a time)."""
    global _hook
    if _hook is not None:
        raise RuntimeError("another attention hook is already in use")
    _hook = hook
    try:
        yield hook
    finally:
        _hook = None


def mask_impact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa attention, or what the hook in use makes of it."""
    for feature, arg in (("attention logit soft-capping", "softcap"), ("learned attention sinks", "s_aux")):
        if kwargs.get(arg) is not None:
            raise UnsupportedModelError(f"{feature} is not reproduced by the knockout engine")
    scaling = module.scaling if scaling is None else scaling

    def run_default(mask):
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)[0]

    if _hook is None:
        return run_default(attention_mask), None
    return _hook.attend(module, query, key, value, attention_mask, scaling, kwargs.get("sliding_window"),
                        run_default), None


def register_attention() -> None:
    """Make "mask_impact" a valid attn_implementation (masks in sdpa's boolean format)."""
    AttentionInterface.register(ATTENTION_NAME, mask_impact_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def select_attention(model) -> None:
    """Route the text decoder's attention through mask_impact; a vision tower keeps sdpa."""
    register_attention()
    sub_configs = getattr(model.config, "sub_configs", {}) or {}
    if "text_config" in sub_configs:
        choice = {name: "sdpa" for name in sub_configs}
        choice["text_config"] = ATTENTION_NAME
        model.set_attn_implementation(choice)
    else:
        model.set_attn_implementation(ATTENTION_NAME)


def text_model(model) -> torch.nn.Module:
    """The text decoder: the module holding the decoder layers (and the final norm)."""
    for root in (getattr(model, "model", None), model):
        for path in ("language_model", "text_model", ""):  # the names transformers gives the decoder
            obj = root
            for part in filter(None, path.split(".")):
                obj = getattr(obj, part, None)
            layers = getattr(obj, "layers", None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
                return obj
    raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__}")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder's layers (the vision tower's blocks are not decoder layers)."""
    return text_model(model).layers


SOFTMAX_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}


def check_config(config) -> None:
    """Refuse, from the config alone (before the weights load), decoders whose layers the engine would not
    reproduce: layers without softmax attention (Qwen3.5's linear attention), layers that read keys and
    values or input embeddings of other layers (Gemma 4), attention logit soft-capping (Gemma 2)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = getattr(text, "model_type", "") or type(text).__name__
    other = sorted(set(getattr(text, "layer_types", None) or ()) - SOFTMAX_LAYER_TYPES)
    if other:
        raise UnsupportedModelError(f"{name}: layers of type {', '.join(other)} have no softmax attention to "
                                    "mask (only full and sliding-window attention layers are supported)")
    if getattr(text, "num_kv_shared_layers", 0) or hasattr(text, "kv_sharing_modes"):
        # Gemma 4's layers hand keys and values to later layers through the model's forward, whatever
        # num_kv_shared_layers is: a layer re-run on its own has none to store or reuse
        raise UnsupportedModelError(f"{name}: the decoder hands keys and values from layer to layer (KV "
                                    "sharing), which the engine's per-layer knockout does not reproduce")
    if getattr(text, "hidden_size_per_layer_input", 0):
        raise UnsupportedModelError(f"{name}: each layer takes its own input embeddings (per-layer inputs), "
                                    "which the engine's per-layer re-runs do not pass")
    if getattr(text, "attn_logit_softcapping", None):
        raise UnsupportedModelError(f"{name}: attention logit soft-capping is not supported")

