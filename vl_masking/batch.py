"""Batch runs: every prompt of a config file, each an ordinary run with its own files, through the runner.

A failing prompt is recorded and the batch goes on. The manifest (runner.py has its format and the locking
policy) is `<output_dir>/<config name>.batch.json`, with each process's part in `<config name>.batch/`;
`--resume` runs again only what is not done with the same settings and every file still there. Under
`accelerate launch --num_processes K` (or torchrun) prompt i belongs to process i mod K, and the merged
manifest is what one process would have written.
"""

import time
from dataclasses import replace
from pathlib import Path

from . import console
from .batch_config import BatchConfig, BatchPrompt
from .errors import UsageError
from .runner import Job, model_key, run_items
from .shard import Shard

# torch, transformers and the engine are imported when a prompt runs: a resume with nothing left
# to do answers at once.


class Batch(Job):
    kind, noun, plural = "batch", "prompt", "prompts"
    settled = ("done", "failed", "skipped")
    kept_note = "the current prompt is marked interrupted and left no file"

    def __init__(self, config: BatchConfig, shard: Shard):
        super().__init__(config.prompts, config.manifest_path, config.manifest_path.with_suffix(""), shard)
        self.config = config

    def title(self) -> str:
        enabled = sum(1 for p in self.items if p.enabled)
        return f"Batch {self.config.path.name}: {len(self.items)} prompts ({enabled} enabled), manifest {self.manifest.path}"

    def what(self) -> str:
        return f"the batch {self.config.path.name}"

    def header(self) -> dict:
        return {"config": str(self.config.path), "tool_kind": self.config.tool.name}

    def check_owner(self) -> None:
        """Refuse to overwrite the manifest of another config that has the same file name."""
        owner = self.manifest.owner("config")
        if isinstance(owner, str) and owner != str(self.config.path):
            raise UsageError(f"the manifest {self.manifest.path} belongs to the config {owner}, not "
                             f"{self.config.path}: give another --output-dir (or rename the config)")

    def fresh(self, prompt: BatchPrompt) -> dict:
        entry = {"name": prompt.name, "status": "pending" if prompt.enabled else "skipped",
                 "settings_hash": prompt.settings_hash, "rows": None, "timings": {}, "paths": {}, "error": None}
        if prompt.settings is not None:
            entry["settings"] = prompt.settings.to_dict()
        return entry

    def to_run(self, prompt: BatchPrompt, entry: dict | None, resume: bool) -> bool:
        """Done earlier with the same settings, and every file still there: not run again by --resume."""
        return not (resume and prompt.enabled and entry is not None and entry.get("status") == "done"
                    and entry.get("settings_hash") == prompt.settings_hash and bool(entry.get("paths"))
                    and all(Path(p).is_file() for p in entry["paths"].values()))

    def order(self, todo: list) -> list:
        """Prompts of the same model next to each other (first-seen order), so each model loads once."""
        order = {}
        for prompt in todo:
            order.setdefault(model_key(prompt.settings), len(order))
        return sorted(todo, key=lambda p: (order[model_key(p.settings)], p.index))

    def run(self, prompt: BatchPrompt, models, shard: Shard, log) -> dict:
        from .api import run

        settings = replace(prompt.settings, device=shard.device(prompt.settings.device))
        started = time.perf_counter()
        log(f"[{prompt.name}]")
        loaded, load_s = models.get(settings)
        result = run(settings, loaded=loaded, log=log)
        timings = dict(result.metadata["timings"], model_load_s=round(load_s, 4),
                       total_s=round(time.perf_counter() - started, 4))
        return {"status": "done", "rows": len(result.table), "paths": result.paths, "error": None,
                "timings": timings}

    def summary(self, merged: list, mine: set, shard: Shard) -> str:
        lines = [console.batch_summary([e for e in merged if e["name"] in mine], self.manifest.path)]
        if shard.size > 1 and all(e["status"] in self.settled for e in merged):
            lines.append(console.batch_totals(merged))
        return "\n".join(lines)


def run_batch(config: BatchConfig, resume: bool = False, log=None) -> int:
    """Run this process's prompts; returns the exit code (0 all done, 1 some failed, 130 / 143 interrupted)."""
    shard = Shard.from_environment()
    if shard.size > 1 and any(p.settings and p.settings.device_map for p in config.prompts):
        raise UsageError("--device-map spreads one model over several GPUs: run it in one process, "
                         "not under accelerate launch --num_processes")
    batch = Batch(config, shard)
    batch.check_owner()
    return run_items(batch, resume=resume, log=log)
