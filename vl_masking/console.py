"""What the command-line tools print: model and input descriptions, the final summary, errors."""

import sys
from collections import Counter
from contextlib import contextmanager

from .knockout import UnsupportedModelError
from .options import UsageError, exit_on_usage_error


def describe_model(loaded) -> str:
    model = loaded.model
    config = getattr(model.config, "text_config", None) or model.config
    params = sum(p.numel() for p in model.parameters())
    return (f"Model: {loaded.name} ({model.config.model_type}, {params / 1e6:.1f}M parameters)\n"
            f"  {config.num_hidden_layers} layers, {config.num_attention_heads} heads "
            f"({config.num_key_value_heads} key-value), hidden {config.hidden_size}; "
            f"{str(loaded.dtype).replace('torch.', '')} on {loaded.device}")


def describe_inputs(inputs, settings, loaded) -> str:
    prompt_len = inputs.input_ids.shape[1]
    lines = [f"Prompt: {prompt_len} tokens"]
    vision = 0
    if inputs.image_grid_thw is not None:
        pad_id = loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        starts = (inputs.input_ids[0] == pad_id).nonzero().flatten().tolist()
        for k, (t, h, w) in enumerate(inputs.image_grid_thw.tolist()):
            rows, cols = h // inputs.merge_size, w // inputs.merge_size
            n = t * rows * cols
            first, last = starts[vision], starts[vision + n - 1]
            vision += n
            size = inputs.image_sizes[k] if k < len(inputs.image_sizes) else ("?", "?")
            lines.append(f"  image {k}: {size[0]}x{size[1]} px -> {rows}x{cols} grid, "
                         f"{n} vision tokens at positions {first}-{last}")
        lines.append(f"  vision attention in the prompt: {settings.vision_attention}")
    text = prompt_len - vision
    masked = {"text": text, "vision": vision, "both": prompt_len}[settings.mask_mode]
    lines.append(f"  mask mode {settings.mask_mode}: {masked} prompt tokens masked, {prompt_len - masked} skipped"
                 + (" (generated tokens are masked too)" if settings.mask_mode != "vision" else ""))
    return "\n".join(lines)


def summary(result) -> str:
    meta = result.metadata
    t = meta["timings"]
    lines = [
        f"Generated ({meta['steps']} step{'s' if meta['steps'] != 1 else ''}, stop: {meta['stop_reason']}): "
        f"{meta['generated_text']!r}",
        f"Rows: {len(result.table)} = steps x layers x masked positions x variants",
        f"Time: load {t.get('model_load_s', 0):.2f} s, analysis {t['analysis_s']:.2f} s, "
        f"write {t.get('write_s', 0):.2f} s",
    ]
    if "check" in meta:
        c = meta["check"]
        lines.append(f"Check: {len(c['triples'])} random (step, layer, position) triples re-run with the reference "
                     f"method, max relative error {c['max_relative_error']:.2e}")
    if result.paths:
        lines.append("Wrote:")
        lines.extend(f"  {path}" for fmt, path in result.paths.items())
    return "\n".join(lines)


def batch_summary(entries: list, manifest_path) -> str:
    """The end-of-batch table: one line per prompt."""
    rows = [("prompt", "status", "rows", "seconds", "output / error")]
    for e in entries:
        seconds = e.get("timings", {}).get("total_s")
        detail = e.get("error") or next(iter((e.get("paths") or {}).values()), "")
        rows.append((e["name"], e["status"], "" if e.get("rows") is None else str(e["rows"]),
                     "" if seconds is None else f"{seconds:.1f}", str(detail).splitlines()[0] if detail else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    return "\n".join([*lines, batch_totals(entries), f"Manifest: {manifest_path}"])


def batch_totals(entries: list) -> str:
    counts = Counter(e["status"] for e in entries)
    return "Prompts: " + ", ".join(f"{n} {status}" for status, n in counts.items())


@contextmanager
def cli_errors():
    """Bad input and unsupported models: one line, exit 2. Ctrl-C: exit 130 (files are atomic)."""
    try:
        yield
    except (UsageError, UnsupportedModelError) as exc:
        exit_on_usage_error(exc)
    except KeyboardInterrupt:
        print("interrupted: no result file was written", file=sys.stderr)
        sys.exit(130)
