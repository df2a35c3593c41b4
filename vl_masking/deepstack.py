"""The DeepStack measure's engine (Qwen3-VL). At some vision blocks a separate merger makes features that the
language model adds to the residual stream at every image position after its decoder layers 0, 1, 2, ... (one
level each). For a level added after layer d and a set of image positions U:

* removed: the level's features subtracted at U from the recorded input of layer d + 1 (the output of layer d
  plus the features), and the layers from d + 1 on re-run to the prediction, the later levels added as the model
  adds them. Nothing before layer d + 1 changes, and no position before the first image position changes at any
  layer, so only the rows from there on are re-run: every configuration (unit) a batch element, attending over
  the recorded keys and values of the earlier positions (flow.RowAttention, nothing blocked);
* injection ratio: the norm of the level's features at U relative to the norm of the residual stream they are
  added to (the output of layer d), both over all of U's rows: sqrt(sum |f|^2) / sqrt(sum |h|^2).
"""

import torch

from .anatomy import attention_hook, text_model
from .flow import RowAttention, metrics_of, rerun_state, run_layer, sequence_of, unchanged
from .knockout import usable_memory


class DeepStackEngine:
    """Every (level, configuration) of one prompt at step 0, after the unblocked generation."""

    def __init__(self, loaded, plan, capture, memory_budget_bytes: int):
        self.loaded, self.plan = loaded, plan
        self.layers = text_model(loaded.model).layers
        image = plan.tokens.view_positions
        self.state = rerun_state(capture, plan, sequence_of(capture, plan, 0, len(self.layers)), 0, image)
        self.budget = usable_memory(memory_budget_bytes, loaded.device)

    def added(self, layer: int) -> torch.Tensor:
        """(R, D) what the model adds after `layer` to each re-run row (zero at the rows it adds nothing to)."""
        state = self.state
        rows, features = state.additions[layer]
        x = state.inputs[layer + 1]
        out = torch.zeros_like(x)
        out[rows.to(x.device)] = features.to(x.device, x.dtype)
        return out

    def hidden(self, configs: list) -> torch.Tensor:
        """(C, R) bool: the re-run rows of each configuration's positions."""
        out = torch.zeros(len(configs), self.state.length - self.state.first_row, dtype=torch.bool)
        for c, positions in enumerate(configs):
            out[c, torch.tensor(positions, dtype=torch.long) - self.state.first_row] = True
        return out

    def ratios(self, layer: int, configs: list) -> torch.Tensor:
        """(C,) float64: the level's feature norm relative to the residual stream's, over each configuration's rows."""
        added = self.added(layer).double()
        residual = self.state.inputs[layer + 1].double() - added  # the output of layer `layer`
        hide = self.hidden(configs).to(added.device).double()
        return (hide @ added.square().sum(-1)).sqrt().cpu() / (hide @ residual.square().sum(-1)).sqrt().cpu()

    def removed(self, layer: int, configs: list, base_logits, target: int) -> dict:
        """Metrics of the level added after `layer` removed at each configuration's positions."""
        if layer + 1 >= len(self.layers):  # added after the last layer: only the image rows change, never the last
            return unchanged(base_logits, target, len(configs))
        state = self.state
        added = self.added(layer)
        x0 = state.inputs[layer + 1]
        hide = self.hidden(configs).to(x0.device)
        hook = RowAttention(state.keys, state.values, state.allowed, state.targets)
        chunk = max(1, int(self.budget // self._per_config()))
        parts = []
        with attention_hook(hook):
            for first in range(0, len(configs), chunk):
                part = hide[first:first + chunk]
                n = part.shape[0]
                x = x0[None] - part[..., None].to(x0.dtype) * added[None]  # (n, R, D)
                hook.hide = torch.zeros(n, state.length, dtype=torch.bool)
                hook.blocking = torch.zeros(n, dtype=torch.bool)
                for later in range(layer + 1, len(self.layers)):
                    x = run_layer(self.layers, later, x, state)
                final = text_model(self.loaded.model).norm(x[:, -1:])[:, 0]
                parts.append(metrics_of(self.loaded, final, base_logits, target))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _per_config(self) -> int:
        """Bytes one configuration's re-run rows need at a layer (float32 activations and attention scores)."""
        r = self.state.length - self.state.first_row
        dims = self.loaded.text_config
        return 4 * r * (dims.num_attention_heads * self.state.length * 3 + dims.hidden_size * 8
                        + getattr(dims, "intermediate_size", 4 * dims.hidden_size) * 3)
