"""What the command-line tools print: model and input descriptions, the final summary, errors, interrupts.

Imports nothing heavy, so that usage errors are reported before torch is loaded.
"""

import signal
import sys
from collections import Counter
from contextlib import contextmanager

from .errors import UnsupportedModelError, UsageError


class PlainProgress:
    """Progress as whole lines ("steps: 3/10 step") for logs and CI, where a bar's carriage returns and cursor
    escapes would pile up: a line at each tenth of the work (at most one every 2 s) and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, stream=None):
        import time

        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self._clock = time.monotonic
        self._last_line, self._last_tenth = self._clock(), 0

    def update(self, n: int = 1) -> None:
        self.done += n
        tenth = 10 * self.done // max(self.total, 1)
        if self.done >= self.total or (tenth > self._last_tenth and self._clock() - self._last_line >= 2):
            self._last_tenth, self._last_line = tenth, self._clock()
            if self.done <= self.total:
                print(f"{self.desc}: {self.done}/{self.total} {self.unit}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str, enabled: bool = True, leave: bool = False):
    """A progress bar on a terminal, plain lines otherwise, nothing when disabled or when there is no work."""
    import os

    if not enabled or total <= 0 or os.environ.get("TQDM_DISABLE"):
        return NoProgress()
    if not sys.stderr.isatty():
        return PlainProgress(total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave)


def write(line: str) -> None:
    """A log line; on a terminal through tqdm, so that it does not cut through a bar."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        tqdm.write(line)
    else:
        print(line, flush=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (files are never left half written), but exit code 143."""


def describe_model(loaded) -> str:
    model = loaded.model
    config = loaded.text_config
    params = sum(p.numel() for p in model.parameters())
    return (f"Model: {loaded.name} ({model.config.model_type}, {params / 1e6:.1f}M parameters)\n"
            f"  {config.num_hidden_layers} layers, {config.num_attention_heads} heads "
            f"({config.num_key_value_heads} key-value), hidden {config.hidden_size}; "
            f"{str(loaded.dtype).replace('torch.', '')} on {loaded.device}")


def describe_inputs(inputs, plan, settings, measure_lines=()) -> str:
    """The prompt, its images and units; measure_lines: each measure's own settings (Measure.describe)."""
    tokens = inputs.tokens
    lines = [f"Prompt: {inputs.prompt_length} tokens ({inputs.prompt_format})"]
    for image in tokens.images:
        lines.append(f"  {image.label}: {image.width}x{image.height} px -> {image.grid_rows}x{image.grid_cols} "
                     f"grid, {image.end - image.start} vision tokens at positions {image.start}-{image.end - 1}")
    if tokens.images:
        lines.append(f"  vision attention in the prompt: {settings.vision_attention} "
                     f"(the model's own: {inputs.model_vision_attention})")
        if settings.vision_attention != inputs.model_vision_attention:
            lines.append(f"  a trained checkpoint is measured as it is with --vision-attention "
                         f"{inputs.model_vision_attention}: {settings.vision_attention} is a mask it never saw "
                         "(on the planted-evidence models it changed no answer; see docs/planted.md)")
    hidden = len({p for u in plan.prompt_units for p in u.positions})
    lines.append(f"  mask mode {settings.mask_mode}, {plan.describe()}; {hidden} of {inputs.prompt_length} prompt "
                 "positions covered" + (" (each generated token is a unit too)" if plan.generated_are_units else ""))
    lines += [f"  {line}" for line in measure_lines]
    return "\n".join(lines)


def non_finite_warning(found: dict, dtype) -> str:
    """One line: how many values are NaN / inf and where (the rows are kept in every format)."""
    kinds = " and ".join(f"{found[k]} {k}" for k in ("nan", "inf") if found[k])
    hint = " (float16 overflow? try --dtype bfloat16 or float32)" if "float16" in str(dtype) else ""
    return (f"warning: {found['count']} values are not finite ({kinds}) in {', '.join(found['columns'])}, "
            f"{found['rows']} rows: layers {ranges(found['layers'])}; {found['series']} {', '.join(found['where'])}{hint}")


def ranges(numbers: list) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, x in enumerate(numbers):
        if start is None:
            start = x
        if i + 1 == len(numbers) or numbers[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts)


def summary(result) -> str:
    meta = result.metadata
    t = meta["timings"]
    lines = [
        f"Generated ({meta['steps']} step{'s' if meta['steps'] != 1 else ''}, stop: {meta['stop_reason']}): "
        f"{meta['generated_text']!r}",
        *[f"Rows{'' if len(result.analyses) == 1 else ' (' + a.measure.name + ')'}: {a.metadata['rows_explained']}"
          for a in result.analyses],
        f"Time: load {t.get('model_load_s', 0):.2f} s, analysis {t['analysis_s']:.2f} s, "
        f"write {t.get('write_s', 0):.2f} s",
    ]
    for a in result.analyses:
        if "check" in a.metadata:
            c = a.metadata["check"]
            lines.append(f"Check{'' if len(result.analyses) == 1 else ' (' + a.measure.name + ')'}: "
                         f"{len(c['checked'])} random results recomputed with the reference method, "
                         f"max error {c['max_error']:.2e}")
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


_written = []  # result files this process has committed (so a late Ctrl-C does not disown them)


def files_written(paths: dict) -> None:
    _written[:] = list(paths.values())


def _terminate(signum, frame):
    raise Terminated()


def interrupt_code(exc: KeyboardInterrupt) -> int:
    return 143 if isinstance(exc, Terminated) else 130


@contextmanager
def cli_errors():
    """Bad input and unsupported models: one line, exit 2. Ctrl-C: exit 130, SIGTERM: exit 143 (files are atomic)."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except (UsageError, UnsupportedModelError) as exc:
        _clear_line()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        _clear_line()
        name = "terminated" if isinstance(exc, Terminated) else "interrupted"
        if _written:  # the signal came after the run was complete
            print(f"{name} after the run finished: its files are complete:", *_written, sep="\n  ", file=sys.stderr)
            sys.exit(0)
        print(f"{name}: no result file was written", file=sys.stderr)
        sys.exit(interrupt_code(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _clear_line():
    """A progress bar drawn on stderr leaves its last frame: clear it before the message."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    sys.stderr.flush()
