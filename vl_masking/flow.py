"""The flow measure's engine: windowed attention knockout, read at the prediction.

After Geva et al. (2023) and Zhang et al. (CVPR 2025): for a source set of positions, a
target set and a window of W layers around layer l, the attention edges from the source
to the target are blocked at every layer of the window (their logits set to -inf), the
model runs to its end, and we read how the probability of the token the unblocked model
predicts changes.

Exact and batched. Blocking edges into the target rows changes nothing before the window
and nothing at positions before the first target row (no earlier position attends to a
later one; with bidirectional image attention the re-run starts at the first image block
that a target row lies in). So for each window the rows from that position to the end
are re-run from the window's first layer, every configuration (source unit) a batch
element: each row computes its own q, k, v through the layer's own modules, attends over
the recorded keys and values of the earlier positions plus the re-run rows' own (through
the attention hook, RowAttention), with the source's keys hidden from the target rows
while the layer is inside the window; then the layer's MLP, the features the family adds after
the layer (Qwen3-VL's DeepStack: models.VisionAdapter.layer_additions), and at the end the final norm and the LM head in float32.
For the target `last` this is one row per configuration: N units x the layers from the
window's start, instead of N full forward passes. Windows with the same first layer share
the layers they agree on.

A row whose every key is blocked at a layer has no softmax: its attention output there
is zero (as in the layer measure), so such a row is reported, not NaN.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from .console import progress as console_progress

from .anatomy import AttentionHook, attention_hook, text_model
from .flow_groups import flow_plan
from .knockout import usable_memory
from .masks import allowed_keys
from .targets import base_prob, head_logits, step_logits, target_token
from .units import positions_mask, unit_columns

METRICS = ("prob", "delta_logprob", "kl", "top1")


@dataclass(frozen=True)
class Window:
    start: int
    end: int  # inclusive


def window_of(centre: int, width: int, num_layers: int) -> Window:
    """W layers around `centre`: centre -/+ W//2 for odd W (for even W the extra layer is below), clipped."""
    below = width // 2
    above = width - 1 - below
    return Window(max(0, centre - below), min(num_layers - 1, centre + above))


class RowAttention(AttentionHook):
    """Attention of C configurations x R re-run rows over the recorded earlier keys plus their own.

    keys/values: layer -> (KVH, t0, d), the unblocked pass's keys of positions before the
    re-run rows; allowed: layer -> (R, S) bool, the model's own mask for those rows;
    targets: (R,) bool, the rows whose edges from the source are blocked; hide: (C, S) bool,
    each configuration's source positions; blocking: (C,) bool, set per layer.
    """

    def __init__(self, keys: dict, values: dict, allowed: dict, targets: torch.Tensor):
        self.keys, self.values, self.allowed, self.targets = keys, values, allowed, targets
        self.hide = None
        self.blocking = None

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window, run_default):
        layer = module.layer_idx
        device = query.device
        k_pre = self.keys[layer].to(device).float()
        v_pre = self.values[layer].to(device).float()
        c, heads, r, d = query.shape
        kv_heads, t0 = k_pre.shape[0], k_pre.shape[1]
        q = query.float().view(c, kv_heads, heads // kv_heads, r, d)
        k_own = key.float().view(c, kv_heads, 1, r, d)
        v_own = value.float().view(c, kv_heads, 1, r, d)
        logits = torch.cat([torch.einsum("ckgrd,ksd->ckgrs", q, k_pre),
                            torch.matmul(q, k_own.transpose(-1, -2))], dim=-1) * scaling
        allowed = self.allowed[layer].to(device)  # (R, S)
        blocked = (self.blocking.to(device)[:, None, None] & self.targets.to(device)[None, :, None]
                   & self.hide.to(device)[:, None, :])  # (C, R, S)
        visible = allowed[None] & ~blocked
        probs = torch.softmax(logits.masked_fill(~visible[:, None, None], float("-inf")), dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # a row with every key blocked: zero output
        out = torch.einsum("ckgrs,ksd->ckgrd", probs[..., :t0], v_pre) + torch.matmul(probs[..., t0:], v_own)
        return out.reshape(c, heads, r, d).transpose(1, 2).to(query.dtype)


@dataclass
class StepState:
    """What the unblocked pass left for one step, restricted to the rows a pair re-runs."""

    step: int
    length: int
    first_row: int  # t0: the first re-run position
    targets: torch.Tensor  # (R,) bool
    allowed: dict  # layer -> (R, S) bool
    keys: dict  # layer -> (KVH, t0, d)
    values: dict
    inputs: dict  # layer -> (R, D) input rows of that layer
    position_embeddings: dict  # layer -> (cos, sin) of the rows
    additions: list  # per layer: (row indices, features) the family adds after it (DeepStack), or None


class FlowEngine:
    """The flow measure's run: every (step, flow, window, source unit) after the unblocked generation."""

    def __init__(self, loaded, inputs, plan, settings, layers: list, memory_budget_bytes: int):
        self.loaded, self.inputs, self.plan, self.settings = loaded, inputs, plan, settings
        self.layers = layers
        self.memory_budget_bytes = memory_budget_bytes
        self.num_layers = len(text_model(self.loaded.model).layers)
        self.centres = self.layers
        self.windows = {c: window_of(c, self.settings.window, self.num_layers) for c in self.centres}
        self.flows = flow_plan(plan, settings)  # each --flow's source units and target positions
        self.results = []  # (step, pair index, units, {Window: metrics arrays})
        self.generated = []
        self.token_text = []  # texts of the prompt and generated tokens (labels of generated units)
        self.capture = None  # the unblocked generation, kept for the reference
        self.base = {}  # step -> (the unblocked logits (V,), target id)
        self.predicted = {}  # step -> the unblocked model's greedy token
        self.target_text_id = target_token(loaded.tokenizer, settings.target, inputs.input_ids[0])  # None: predicted
        self._sequence_step, self._sequence_cache = None, []  # the step whose whole-sequence tensors are held

    # -- the run --------------------------------------------------------------------------
    def finish(self, capture, generated: list, progress: bool) -> None:
        self.generated = generated
        self.capture = capture
        steps = capture.step + 1
        tok = self.loaded.tokenizer
        self.token_text = self.plan.tokens.text[: self.plan.prompt_length] + [
            tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in generated]
        distinct = sorted(set(self.windows.values()), key=lambda w: (w.start, w.end))
        work = steps * len(self.flows.pairs) * len(distinct)
        bar = console_progress(work, "flow windows", "window", enabled=progress)
        try:
            for step in range(steps):
                base_logits = step_logits(self.loaded, capture, step)
                predicted = generated[step] if step < len(generated) else int(base_logits.argmax())
                self.predicted[step] = predicted
                target = predicted if self.target_text_id is None else self.target_text_id
                self.base[step] = (base_logits, target)
                for index, pair in enumerate(self.flows.pairs):
                    units = self.flows.sources(pair, step, self.token_text)
                    targets = self.flows.targets(pair, step)
                    metrics = self._pair_step(capture, step, units, targets, distinct, bar)
                    self.results.append((step, index, units, metrics))
        finally:
            bar.close()

    def _pair_step(self, capture, step, units, targets, windows, bar) -> dict:
        """{Window: metrics of every unit} for one (step, pair)."""
        base_logits, target = self.base[step]
        if not targets or not units:
            return {w: unchanged(base_logits, target, len(units)) for w in windows}
        state = self._state(capture, step, targets)
        hide = positions_mask([u.positions for u in units], state.length, self.loaded.device)
        edges = self._edges(state, hide)  # (N, L): unit n has an edge to block at layer l
        ordered = sorted(windows, key=lambda w: (w.start, w.end))
        has = torch.stack([edges[:, w.start: w.end + 1].any(dim=1) for w in ordered], dim=1)  # (N, windows)
        # Windows are carried together, each joining at its first layer, as many as fit beside all the units
        # at once: one layer call per layer for a group flow, instead of one pass per window.
        budget = usable_memory(self.memory_budget_bytes, self.loaded.device)
        size = max(1, int(budget // (self._per_config(state) * max(1, int(has.any(dim=1).sum())))))
        results = {}
        for first in range(0, len(ordered), size):
            group = ordered[first: first + size]
            mine = has[:, first: first + size]
            todo = torch.nonzero(mine.any(dim=1)).flatten().tolist()
            computed = self._run_group(state, group, hide, todo, base_logits, target) if todo else {}
            for gi, window in enumerate(group):
                metrics = unchanged(base_logits, target, len(units))
                if todo:
                    rows = torch.tensor(todo)
                    keep = mine[rows, gi].cpu()  # units without an edge in this window keep the base values
                    for name in METRICS:
                        metrics[name][rows[keep]] = computed[window][name][keep]
                results[window] = metrics
            bar.update(len(group))
        return results

    def _state(self, capture, step, targets) -> StepState:
        return rerun_state(capture, self.plan, self._sequence(capture, step), step, targets)

    def _sequence(self, capture, step: int) -> list:
        """sequence_of, once a step."""
        if self._sequence_step != step:
            self._sequence_cache = sequence_of(capture, self.plan, step, self.num_layers)
            self._sequence_step = step
        return self._sequence_cache

    def _edges(self, state: StepState, hide: torch.Tensor) -> torch.Tensor:
        """(N, L) bool: at layer l, some target row may attend to some of unit n's positions."""
        per_layer = []
        for layer in range(self.num_layers):
            seen = state.allowed[layer].to(hide.device)[state.targets.to(hide.device)].any(dim=0)  # (S,)
            per_layer.append((hide & seen).any(dim=1))
        return torch.stack(per_layer, dim=1)

    def _per_config(self, state) -> int:
        """Bytes one (unit, window) of re-run rows needs at a layer (its activations, float32)."""
        r = state.length - state.first_row
        dims = self.loaded.text_config
        return 4 * r * (dims.num_attention_heads * state.length * 3 + dims.hidden_size * 8
                        + getattr(dims, "intermediate_size", 4 * dims.hidden_size) * 3)

    def _run_group(self, state, windows, hide, todo, base_logits, target) -> dict:
        """Carry the re-run rows of units `todo` through the layers from the group's first start (each window
        joining at its own), one branch per set of windows that still agree; returns {Window: metrics}."""
        model = self.loaded.model
        layers = text_model(model).layers
        start = min(w.start for w in windows)
        budget = usable_memory(self.memory_budget_bytes, self.loaded.device)
        chunk = max(1, int(budget // (self._per_config(state) * len(windows))))
        out = {w: {name: [] for name in METRICS} for w in windows}
        hook = RowAttention(state.keys, state.values, state.allowed, state.targets)
        at = 0
        while at < len(todo):
            units = todo[at: at + chunk]
            try:
                finals = self._carry(hook, layers, state, windows, hide[units], start)
            except torch.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                continue
            for window, hidden in finals.items():
                for name, values in metrics_of(self.loaded, hidden, base_logits, target).items():
                    out[window][name].append(values)
            at += chunk
        return {w: {name: torch.cat(v) for name, v in m.items()} for w, m in out.items()}

    def _carry(self, hook, layers, state, windows, hide, start) -> dict:
        """{Window: final-norm output of the last row (n, D)} for the n units of `hide`."""
        n = hide.shape[0]
        joining = {}
        for window in windows:
            joining.setdefault(window.start, []).append(window)
        branches = []
        with attention_hook(hook):
            for layer in range(start, self.num_layers):
                if layer in joining:  # windows that start blocking here begin from the unblocked rows
                    branches.append((joining[layer], state.inputs[layer].unsqueeze(0).expand(n, -1, -1).clone()))
                split = []
                for members, x in branches:  # windows that stop blocking here leave as a branch of their own
                    inside = [w for w in members if w.end >= layer]
                    done = [w for w in members if w.end < layer]
                    if inside and done:
                        split += [(inside, x), (done, x.clone())]
                    else:
                        split.append((members, x))
                branches = split
                x = torch.cat([b[1] for b in branches])
                hook.hide = hide.repeat(len(branches), 1)
                hook.blocking = torch.tensor([any(w.end >= layer for w in members) for members, _ in branches],
                                             dtype=torch.bool).repeat_interleave(n)
                x = run_layer(layers, layer, x, state)
                branches = [(members, part) for (members, _), part in zip(branches, x.split(n))]
        norm = text_model(self.loaded.model).norm
        return {members[0]: norm(x[:, -1:])[:, 0] for members, x in branches}

    # -- the table ------------------------------------------------------------------------
    def table(self, token_map) -> pd.DataFrame:
        tok = self.loaded.tokenizer
        parts = {k: [] for k in ("step", "flow", "centre", "start", "end", "unit", *METRICS, "target", "base",
                                 "predicted")}
        all_units, unit_index = [], {}
        for step, pair_index, units, metrics in self.results:
            base_logits, target = self.base[step]
            p0 = base_prob(base_logits, target)
            ids = []
            for u in units:
                key = (u.kind, u.positions, u.label)
                if key not in unit_index:
                    unit_index[key] = len(all_units)
                    all_units.append(u)
                ids.append(unit_index[key])
            for centre in self.centres:
                window = self.windows[centre]
                m = metrics[window]
                n = len(units)
                parts["step"].append(np.full(n, step, np.int32))
                parts["flow"].append(np.full(n, pair_index, np.int32))
                parts["centre"].append(np.full(n, centre, np.int32))
                parts["start"].append(np.full(n, window.start, np.int32))
                parts["end"].append(np.full(n, window.end, np.int32))
                parts["unit"].append(np.asarray(ids, np.int64))
                for name in METRICS:
                    parts[name].append(m[name].cpu().numpy())
                parts["target"].append(np.full(n, target, np.int64))
                parts["base"].append(np.full(n, p0, np.float64))
                parts["predicted"].append(np.full(n, self.predicted[step], np.int64))
        if not all_units:
            return None
        joined = {k: np.concatenate(v) for k, v in parts.items()}
        return metric_frame(tok, joined, [pair.name for pair in self.flows.pairs], all_units)

    def rows_explained(self, steps: int) -> str:
        per_step = []
        for step in range(steps):
            per_step.append(sum(len(self.flows.sources(p, step)) for p in self.flows.pairs))
        total = sum(per_step) * len(self.centres)
        units = (f"{per_step[0]} source units" if len(set(per_step)) <= 1
                 else f"({' + '.join(map(str, per_step))}) source units")
        return (f"{total} = {steps} step{'s' if steps != 1 else ''} x {len(self.centres)} windows x {units}"
                f" ({len(self.flows.pairs)} flow{'s' if len(self.flows.pairs) != 1 else ''})")

    def metadata(self) -> dict:
        return {"flows": [p.name for p in self.flows.pairs], "window": self.settings.window,
                "windows": {str(c): [w.start, w.end] for c, w in self.windows.items()},
                "flow_all_blocked": "a row whose every key is blocked at a layer gets a zero attention output there"}

    # -- the reference ----------------------------------------------------------------------
    def reference(self, step: int, pair_index: int, unit_index: int, centre: int) -> dict:
        """The same result by full forward passes (the oracle of tests and --check): the configuration from the
        plan, everything else (masks, forward passes, metrics) by reference.reference_flow."""
        from .reference import reference_flow

        pair = self.flows.pairs[pair_index]
        unit = self.flows.sources(pair, step, self.token_text)[unit_index]
        window = self.windows[centre]
        capture = self.capture
        return reference_flow(self.loaded.model, step_forward_kwargs(self, step), self.base[step][1],
                              blocked=(list(unit.positions), list(self.flows.targets(pair, step))),
                              layers=range(window.start, window.end + 1), num_layers=self.num_layers,
                              vision_blocks=capture.vision_blocks, sliding_windows=capture.sliding_windows)

    def check(self, capture, k: int, table) -> dict:
        """Recompute k distinct random (step, flow, unit, window) results with one full forward pass each and
        compare them with the table's rows."""
        from .reference import check_draws

        checked = []
        results = [r for r in self.results if r[2]]
        n = len(self.centres)
        steps, layers = table["generation_step"].to_numpy(), table["layer"].to_numpy()
        flows = table["flow"].astype(str).to_numpy()
        for index, item in check_draws([len(r[2]) * n for r in results], k):
            step, pair_index, units, metrics = results[index]
            unit_index, centre = item // n, self.centres[item % n]
            rows = table[(steps == step) & (layers == centre) & (flows == self.flows.pairs[pair_index].name)]
            row = rows.iloc[unit_index]  # the flow's source units in their order
            ours = {"prob": float(row["prob"]), "delta_logprob": float(row["delta_logprob"]), "kl": float(row["kl"]),
                    "rel_change_pct": float(row["rel_change_pct"]), "base_prob": float(row["base_prob"])}
            ref = self.reference(step, pair_index, unit_index, centre)
            checked.append({"step": step, "flow": self.flows.pairs[pair_index].name, "layer": centre,
                            "unit": units[unit_index].label, "max_error": flow_error(ours, ref)})
        return {"checked": checked, "max_error": max((c["max_error"] for c in checked), default=0.0)}


def sequence_of(capture, plan, step: int, num_layers: int) -> list:
    """Per layer at `step`: mask, keys, values, input and position embeddings of every position."""
    length = plan.prompt_length + step
    out = []
    for layer in range(num_layers):
        keys, values = capture.keys_values(layer, step)
        allowed = allowed_keys(length, capture.vision_blocks, capture.sliding_windows.get(layer), keys.device)
        out.append((allowed, keys, values, *capture.sequence_input(layer, step)))
    return out


def rerun_state(capture, plan, sequence: list, step: int, targets) -> StepState:
    """What the unblocked pass left for re-running the rows from the first of `targets` (from the start of its
    image block, where an image's tokens see each other) to the end of `step`; sequence: sequence_of's."""
    length = plan.prompt_length + step
    t0 = min(targets)
    if plan.bidirectional:  # rows of an image block see each other: re-run from the block's start
        for start, end in plan.tokens.pictures:
            if start < t0 < end:
                t0 = start
    rows = torch.zeros(length - t0, dtype=torch.bool)
    rows[torch.tensor(targets) - t0] = True
    state = StepState(step=step, length=length, first_row=t0, targets=rows, allowed={}, keys={}, values={},
                      inputs={}, position_embeddings={}, additions=[None] * len(sequence))
    for layer, (allowed, keys, values, hidden, (cos, sin)) in enumerate(sequence):
        state.allowed[layer] = allowed[t0:]
        state.keys[layer], state.values[layer] = keys[:, :t0], values[:, :t0]
        state.inputs[layer] = hidden[0, t0:]
        state.position_embeddings[layer] = (cos[..., t0:, :], sin[..., t0:, :])
    if capture.additions is not None:
        at = torch.nonzero(capture.additions[0]).flatten().cpu()
        inside = (at >= t0) & (at < length)
        rows_of = (at[inside] - t0)
        for layer, features in enumerate(capture.additions[1]):
            if bool(inside.any()):
                state.additions[layer] = (rows_of, features[inside.to(features.device)])
    return state


def run_layer(layers, layer: int, x: torch.Tensor, state: StepState) -> torch.Tensor:
    """Decoder layer `layer` on re-run rows x (n, R, D) (attention through whatever hook is in use), then what the
    family adds to some rows after it (Qwen3-VL's DeepStack)."""
    cos, sin = state.position_embeddings[layer]
    x = layers[layer](x, attention_mask=None, position_embeddings=(cos, sin))
    x = x[0] if isinstance(x, tuple) else x
    extra = state.additions[layer]
    if extra is not None:
        index, features = extra
        index = index.to(x.device)
        x[:, index] = x[:, index] + features.to(x.device, x.dtype)
    return x


def flow_error(ours: dict, ref: dict) -> float:
    """prob relative to max(|prob|, 1e-6); delta_logprob and kl absolute; with the written rel_change_pct (and the
    base_prob it is relative to), that change against the one the reference's prob gives, in percent points
    relative to 100 (the change's own rounding: a float32 prob's error scaled by 100 / base_prob)."""
    error = max(abs(ours["prob"] - ref["prob"]) / max(abs(ref["prob"]), 1e-6),
                abs(ours["delta_logprob"] - ref["delta_logprob"]), abs(ours["kl"] - ref["kl"]))
    if "rel_change_pct" in ours:
        base = ours["base_prob"]
        expected = (ref["prob"] - base) / base * 100.0 if base > 0 else 0.0
        error = max(error, abs(ours["rel_change_pct"] - expected) / 100.0 * base / max(abs(ref["prob"]), 1e-6))
    return error


def step_forward_kwargs(measure: FlowEngine, step: int) -> dict:
    """Inputs of one full forward pass over the prompt plus the first `step` generated tokens."""
    inputs, loaded = measure.inputs, measure.loaded
    ids = torch.tensor(inputs.input_ids[0].tolist() + measure.generated[:step])[None].to(loaded.device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for name, value in inputs.model_kwargs.items():
        if name in kwargs:
            continue
        if name in inputs.position_kwargs:  # one value per position: zero at the generated ones
            padded = torch.zeros_like(ids, dtype=value.dtype)
            padded[:, : inputs.prompt_length] = value
            value = padded
        kwargs[name] = value.to(loaded.device, loaded.dtype if value.is_floating_point() else value.dtype)
    return kwargs


def metrics_of(loaded, hidden: torch.Tensor, base_logits: torch.Tensor, target: int) -> dict:
    """prob, delta_logprob, KL(base || blocked) and the blocked top-1 for each final hidden state (n, D)."""
    base = base_logits.to(loaded.model.get_output_embeddings().weight.device)
    rows = max(1, (1 << 24) // base.shape[-1])  # n x vocabulary float64 values at a time: at most 128 MB
    parts = [logit_metrics(head_logits(loaded, part), base, target) for part in hidden.split(rows)]
    return {name: torch.cat([p[name] for p in parts]) for name in METRICS}


def logit_metrics(logits: torch.Tensor, base_logits: torch.Tensor, target: int) -> dict:
    """The metrics of float32 logits (n, V) against the unblocked logits (V,).

    With z the logits and lse their logsumexp, log p = z - lse, so (the p0 summing to one)
    KL = sum p0 (log p0 - log p) = p0 . (z0 - z) + lse - lse0: a sum of small differences, and
    log p is never materialised. The sums run in float64: in float32, lse (about 20 for a trained
    model) and a 49k-term dot product each carry rounding of a few 1e-6, far above float32
    rounding of a small KL; from float32 logits the float64 sums are exact to the output's float32.
    """
    base = base_logits.double()
    base_lse = torch.logsumexp(base, dim=-1)
    base_p = (base - base_lse).exp()
    wide = logits.double()
    lse = torch.logsumexp(wide, dim=-1)
    logp_target = wide[:, target] - lse
    return {"prob": logp_target.exp().float().cpu(),
            "delta_logprob": (logp_target - (base[target] - base_lse)).float().cpu(),
            "kl": ((base - wide) @ base_p + lse - base_lse).clamp_min(0).float().cpu(),
            "top1": logits.argmax(dim=-1).cpu()}


def unchanged(base_logits: torch.Tensor, target: int, n: int) -> dict:
    """Metrics of configurations that block nothing: exactly the unblocked values."""
    return {"prob": torch.full((n,), base_prob(base_logits, target)), "delta_logprob": torch.zeros(n),
            "kl": torch.zeros(n), "top1": torch.full((n,), int(base_logits.argmax()), dtype=torch.long)}


def metric_frame(tok, joined: dict, series: list, units: list) -> pd.DataFrame:
    """The rows of a measure read at the prediction (flow, encoder-flow): joined holds per row step, flow (the
    series' code), centre, start, end, unit (an index into units), prob, delta_logprob, kl, top1, target, base
    (the unblocked probability) and predicted."""
    prob, before = joined["prob"].astype(np.float64), joined["base"]
    top1 = joined["top1"].astype(np.int64)
    predicted = joined["predicted"]
    vocabulary = sorted(set(top1.tolist()) | set(joined["target"].tolist()) | set(predicted.tolist()))
    text = {i: tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in vocabulary}
    frame = pd.DataFrame({
        "generation_step": joined["step"],
        "flow": pd.Categorical.from_codes(joined["flow"], series),
        "layer": joined["centre"], "window_start": joined["start"], "window_end": joined["end"],
        **unit_columns(units, joined["unit"]),
        "target_token_id": joined["target"],
        "target_token": pd.Categorical([text[i] for i in joined["target"].tolist()]),
        "predicted_token": pd.Categorical([text[i] for i in predicted.tolist()]),
        "correct": predicted == joined["target"],
        "base_prob": before.astype(np.float32),
        "prob": prob.astype(np.float32),
        "rel_change_pct": ((prob - before) / before * 100.0).astype(np.float32),
        "delta_logprob": joined["delta_logprob"].astype(np.float32),
        "kl": joined["kl"].astype(np.float32),
        "top1_changed": top1 != predicted,
        "new_top1_token": pd.Categorical([text[i] for i in top1.tolist()]),
    })
    frame.loc[frame.prob.to_numpy() == frame.base_prob.to_numpy(), "rel_change_pct"] = 0.0
    return frame


def step0_frame(tok, rows: list, series: list, units: list, target: dict, predicted: int) -> pd.DataFrame:
    """metric_frame of a measure read at the prediction at step 0 (encoder-flow, DeepStack): rows are (series
    code, centre, window start, window end, unit indices (n,), metrics of those n units); target: the step's
    targets record (target_token_id, base_prob); predicted: the unblocked model's token."""
    parts = {k: [] for k in ("step", "flow", "centre", "start", "end", "unit", *METRICS, "target", "base",
                             "predicted")}
    for code, centre, start, end, index, metrics in rows:
        n = len(index)
        for key, value in (("step", 0), ("flow", code), ("centre", centre), ("start", start), ("end", end)):
            parts[key].append(np.full(n, value, np.int32))
        for key, value in (("target", target["target_token_id"]), ("base", target["base_prob"]),
                           ("predicted", predicted)):
            parts[key].append(np.full(n, value))
        parts["unit"].append(np.asarray(index, np.int64))
        for key in METRICS:
            parts[key].append(metrics[key].cpu().numpy())
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    joined["base"] = joined["base"].astype(np.float64)
    return metric_frame(tok, joined, series, units)
