"""Capture: the decoder-layer hooks and the attention hook that record the unblocked generation.

Through the one attention hook mechanism (anatomy.py), every decoder that uses transformers'
AttentionInterface (Qwen-VL, LLaVA's Llama, Qwen3, Qwen2, Llama, Mistral, Gemma 3) is served by
the same code. Three hooks exist:

* Capture (here): records the unblocked generation (each layer's input, the last query,
  keys and values, the final hidden state), with each image's tokens seeing each other in
  the prompt prefill when vision attention is bidirectional;
* flow.RowAttention: the attention of re-run rows over recorded keys, with edges blocked;
* reference.LayerMasks: the reference's per-layer 4D masks in a full forward pass.
"""

import torch

from .anatomy import AttentionHook, attention_hook, check_config, decoder_layers, text_model
from .errors import UnsupportedModelError
from .knockout import LastQuery, LayerTail
from .masks import prompt_mask

def check_supported(model) -> None:
    """Refuse, before any work, models whose attention the engine would not reproduce."""
    check_config(model.config)
    config = getattr(model.config, "text_config", None) or model.config
    for name, _ in model.named_parameters():
        if name.endswith("self_attn.sinks"):
            raise UnsupportedModelError(f"{config.model_type}: learned attention sinks are not supported")
    for layer in decoder_layers(model):
        LayerTail(layer)


class Capture(AttentionHook):
    """Record the unblocked generation while in use (a context manager).

    measured_layers / on_layer: after each of these layers finishes, on_layer(step, layer,
    pending, length) gets the layer's input at the last position ('x_last'), the last query
    with K and V ('last_query') and the attention module ('attention').
    keep_layer_inputs: every layer's input (all rows) and position embeddings, per step.
    keep_keys_values: every layer's keys and values (all positions), and what the family adds after some
    layers (layer_additions: the adapter's reader of the language model's call, Qwen3-VL's DeepStack).
    Always: the final hidden state of the last position per step and, when the LM head computes in
    float32, its logits there (what generate computed anyway: no second pass through the head).
    """

    def __init__(self, model, measured_layers=(), on_layer=None, vision_blocks=None, keep_layer_inputs=False,
                 keep_keys_values=False, on_step_done=None, layer_additions=None):
        self.text_model = text_model(model)
        self.layers = self.text_model.layers
        self.measured = set(measured_layers)
        self.on_layer = on_layer
        self.vision_blocks = vision_blocks  # (S_prompt,) image index per position, -1 elsewhere; None = causal
        self.keep_layer_inputs = keep_layer_inputs or keep_keys_values
        self.keep_keys_values = keep_keys_values
        self.on_step_done = on_step_done
        self.layer_inputs = {}  # layer -> [hidden (1, q, D) per step], when keep_layer_inputs
        self.position_embeddings = {}  # layer -> [(cos, sin) per step], when keep_layer_inputs
        self.keys, self.values = {}, {}  # layer -> [new keys / values (KVH, q, d) per step]
        self.final_hidden = []  # per step: the final norm's output at the last position (D,)
        self.head = model.get_output_embeddings()
        # per step: the LM head's float32 output at the last position (V,), before any cap; targets.step_logits
        # fills it from final_hidden for a low-precision head, which this hook leaves alone
        self.head_logits = []
        self.read_additions = layer_additions
        self.additions = None  # (positions (S_prompt,) bool, [features (n, D) added after layer l]): DeepStack
        self.sliding_windows = {}  # layer -> the sliding window the model passed to attention (None: full)
        self.step = -1
        self.length = 0
        self._pending = {}
        self._handles = []

    def sequence_input(self, layer: int, step: int):
        """Layer `layer`'s input over the whole sequence at `step`, and its position embeddings.

        The prefill captured the prompt rows and each decode step one more row, so the
        concatenation is the input the layer had in the unmasked forward pass.
        """
        hidden = torch.cat(self.layer_inputs[layer][: step + 1], dim=1)
        per_step = self.position_embeddings[layer][: step + 1]
        embeddings = tuple(torch.cat([pe[i] for pe in per_step], dim=-2) for i in (0, 1))
        return hidden, embeddings

    def keys_values(self, layer: int, step: int) -> tuple:
        """(K, V) of every position at `step`, each (KVH, length, d), as the unblocked pass made them."""
        count = step + 1
        return (torch.cat(self.keys[layer][:count], dim=1), torch.cat(self.values[layer][:count], dim=1))

    # -- context --------------------------------------------------------------------
    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_start(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._layer_end(i)))
        # Every measure records the target's probability and the prediction from the final hidden state.
        self._handles.append(self.text_model.norm.register_forward_hook(self._final_norm))
        if self.head is not None and self.head.weight.dtype == torch.float32:
            self._handles.append(self.head.register_forward_hook(self._head_output))
        if self.keep_keys_values:
            self._handles.append(self.text_model.register_forward_pre_hook(self._text_model_start, with_kwargs=True))
        self._context = attention_hook(self)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        self._context.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        return False

    # -- hooks ----------------------------------------------------------------------
    def _text_model_start(self, module, args, kwargs):
        if self.read_additions is not None and self.additions is None:
            self.additions = self.read_additions(kwargs)

    def _final_norm(self, module, args, output):
        self.final_hidden.append(output[0, -1].detach().clone())

    def _head_output(self, module, args, output):
        self.head_logits.append(output[0, -1].detach().clone())

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
            if index in self.measured:
                self._pending[index] = {"x_last": hidden[0, -1].detach()}
        return hook

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        attention_mask = self.prompt_mask(query, key, attention_mask, sliding_window)
        out = run_default(attention_mask)
        index = module.layer_idx
        self.sliding_windows[index] = sliding_window
        if self.keep_keys_values:
            new = query.shape[2]
            self.keys.setdefault(index, []).append(key[0, :, -new:].detach().clone())
            self.values.setdefault(index, []).append(value[0, :, -new:].detach().clone())
        if index in self._pending:
            allowed = None
            if attention_mask is not None:
                row = attention_mask[0, 0, -1]
                allowed = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
            self._pending[index]["last_query"] = LastQuery(
                q=query[0, :, -1].float(), k=key[0].float(), v=value[0].float(), allowed=allowed,
                scaling=float(scaling), key_offset=self.length - key.shape[2], length=self.length)
            self._pending[index]["attention"] = module
        return out

    def _layer_end(self, index):
        def hook(module, args, output):
            pending = self._pending.pop(index, None)
            if pending is not None and self.on_layer is not None:
                with torch.no_grad():
                    self.on_layer(self.step, index, pending, self.length)
            if index == len(self.layers) - 1 and self.on_step_done is not None:
                self.on_step_done(self.step)
        return hook

    def prompt_mask(self, query, key, attention_mask, sliding_window=None):
        return prompt_mask(query, key, attention_mask, self.vision_blocks, sliding_window)
