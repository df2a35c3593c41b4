"""Capture: the registered attention function and the decoder-layer hooks.

One mechanism serves every decoder that uses transformers' AttentionInterface
(Qwen3-VL, Qwen3, Qwen2, Llama, Mistral, Gemma 3): the function registered as
"mask_impact" runs the model's normal attention (sdpa) and, while a Capture is
active, hands the last query, K, V and the model's own mask row to the
measurement. Forward pre-hooks on the decoder layers record each layer's input
(the residual stream the layer adds to, after any DeepStack addition by the
previous layer), and forward hooks run the measurement once the layer is done.
No model class is patched; outside a Capture the function is plain sdpa.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .knockout import LastQuery, LayerTail, UnsupportedModelError, measure_layer

ATTENTION_NAME = "mask_impact"
_active = None  # the Capture in progress, if any


def mask_impact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa attention that also feeds the active Capture (if any) with the last query row."""
    for feature, arg in (("attention logit soft-capping", "softcap"), ("learned attention sinks", "s_aux")):
        if kwargs.get(arg) is not None:
            raise UnsupportedModelError(f"{feature} is not reproduced by the knockout engine")
    capture = _active
    if capture is not None:
        attention_mask = capture.prompt_mask(query, key, attention_mask)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    if capture is not None:
        capture.on_attention(module, query, key, value, attention_mask,
                             module.scaling if scaling is None else scaling, kwargs.get("sliding_window"))
    return out, weights


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


def decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder's layers (the vision tower's blocks are not decoder layers)."""
    for root in (getattr(model, "model", None), model):
        for path in ("language_model.layers", "layers"):
            obj = root
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.nn.ModuleList) and len(obj) and hasattr(obj[0], "self_attn"):
                return obj
    raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__}")


def check_supported(model) -> None:
    """Refuse, before any work, models whose attention the engine would not reproduce."""
    config = getattr(model.config, "text_config", None) or model.config
    if getattr(config, "attn_logit_softcapping", None):
        raise UnsupportedModelError(f"{config.model_type}: attention logit soft-capping is not supported")
    for name, _ in model.named_parameters():
        if name.endswith("self_attn.sinks"):
            raise UnsupportedModelError(f"{config.model_type}: learned attention sinks are not supported")
    for layer in decoder_layers(model):
        LayerTail(layer)


class Capture:
    """Measure every analysed forward pass while active (a context manager).

    plan.positions_for(step, length) gives the key positions to hide at each step;
    results land in self.records as (step, layer, {group: (l2, cos)}).
    """

    def __init__(self, model, layers, variants, positions_for, vision_blocks=None, memory_budget_bytes=256 << 20,
                 keep_layer_inputs=False, on_step_done=None):
        self.model = model
        self.layers = decoder_layers(model)
        self.selected = set(layers)
        self.variants = tuple(variants)
        self.positions_for = positions_for
        self.vision_blocks = vision_blocks  # (S_prompt,) image index per position, -1 elsewhere; None = causal
        self.memory_budget_bytes = memory_budget_bytes
        self.keep_layer_inputs = keep_layer_inputs
        self.on_step_done = on_step_done
        self.tails = {i: LayerTail(layer) for i, layer in enumerate(self.layers)}
        self.records = []
        self.layer_inputs = {}  # layer -> [hidden (1, q, D) per step], when keep_layer_inputs
        self.position_embeddings = {}  # layer -> [(cos, sin) per step], when keep_layer_inputs
        self.sliding_windows = {}  # layer -> the sliding window the model passed to attention (None: full)
        self.step = -1
        self.length = 0
        self._pending = {}
        self._handles = []

    def sequence_input(self, layer: int, step: int):
        """Layer `layer`'s input over the whole sequence at `step`, and its position embeddings.

        The prefill captured the prompt rows and each decode step one more row, so the
        concatenation is the input the layer had in the unmasked forward pass (keep_layer_inputs).
        """
        hidden = torch.cat(self.layer_inputs[layer][: step + 1], dim=1)
        per_step = self.position_embeddings[layer][: step + 1]
        embeddings = tuple(torch.cat([pe[i] for pe in per_step], dim=-2) for i in (0, 1))
        return hidden, embeddings

    # -- context --------------------------------------------------------------------
    def __enter__(self):
        global _active
        if _active is not None:
            raise RuntimeError("another Capture is already active")
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_start(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._layer_end(i)))
        _active = self
        return self

    def __exit__(self, *exc):
        global _active
        _active = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        return False

    # -- hooks ----------------------------------------------------------------------
    def _layer_start(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                self.step += 1
                self.length += hidden.shape[1]
            if self.keep_layer_inputs:
                cos, sin = kwargs["position_embeddings"]
                self.position_embeddings.setdefault(index, []).append((cos.detach().clone(), sin.detach().clone()))
                self.layer_inputs.setdefault(index, []).append(hidden.detach().clone())
            if index in self.selected:
                self._pending[index] = {"x_last": hidden[0, -1].detach()}
        return hook

    def on_attention(self, module, query, key, value, attention_mask, scaling, sliding_window=None):
        index = module.layer_idx
        self.sliding_windows[index] = sliding_window
        if index not in self._pending:
            return
        allowed = None
        if attention_mask is not None:
            row = attention_mask[0, 0, -1]
            allowed = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
        self._pending[index]["last_query"] = LastQuery(
            q=query[0, :, -1].float(), k=key[0].float(), v=value[0].float(), allowed=allowed,
            scaling=float(scaling), key_offset=self.length - key.shape[2], length=self.length)
        self._pending[index]["attention"] = module

    def _layer_end(self, index):
        def hook(module, args, output):
            pending = self._pending.pop(index, None)
            if pending is not None:
                positions = self.positions_for(self.step, self.length)
                with torch.no_grad():
                    values, _ = measure_layer(
                        pending["last_query"], positions, pending["x_last"], pending["attention"],
                        self.tails[index], self.variants, self.memory_budget_bytes)
                self.records.append((self.step, index, values))
            if index == len(self.layers) - 1 and self.on_step_done is not None:
                self.on_step_done(self.step)
        return hook

    def prompt_mask(self, query, key, attention_mask):
        """During the prompt prefill in bidirectional mode: causal, plus each image's tokens see each other."""
        blocks = self.vision_blocks
        q_len, k_len = query.shape[2], key.shape[2]
        if blocks is None or q_len == 1 or k_len != q_len or q_len != blocks.numel():
            return attention_mask
        if attention_mask is None:
            base = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
        else:
            base = attention_mask[0, 0]
            if base.dtype != torch.bool:
                base = base > torch.finfo(base.dtype).min / 2
        blocks = blocks.to(query.device)
        same_image = (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)
        return (base | same_image)[None, None]
