"""Batch runs: every prompt of a config file, one manifest, resumable, sharded across processes.

Each prompt is one ordinary run (its own files, per the output contract). After each
prompt the manifest `<output_dir>/<config name>.batch.json` is rewritten atomically
with every prompt's status (pending, running, done, failed, skipped, interrupted),
settings hash, timings, row count, output paths and, for failures, the error. A
failing prompt is recorded and the batch goes on.

Under `accelerate launch --num_processes K` (or torchrun) prompt i belongs to process
i mod K. Each process keeps the manifest entries of its own prompts and updates the
shared file under an exclusive lock, so the merged manifest is what one process
would have written.
"""

import fcntl
import gc
import json
import os
import socket
import sys
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from . import __version__, console
from .batch_config import BatchConfig, BatchPrompt
from .errors import UsageError
from .results import write_text_atomically
from .shard import Shard

# torch, transformers and the engine are imported when a prompt runs: a resume with nothing left
# to do answers at once.

FINAL = ("done", "failed", "skipped")


class Manifest:
    """The batch's manifest file, shared by all processes of a sharded run."""

    def __init__(self, config: BatchConfig, shard: Shard):
        self.config = config
        self.shard = shard
        self.path = config.manifest_path

    @contextmanager
    def _locked(self):
        """Exclusive access to the manifest across processes (a lock on its directory)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def read(self, warn=None) -> dict:
        """The entries of the manifest on disk; {} when there is none (or, with a warning, when it is damaged)."""
        return self._load(warn)[0]

    def _load(self, warn=None) -> tuple:
        """(entries, running processes) of the manifest on disk, from one read of it."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, []
        except OSError as exc:
            return self._damaged(warn, exc.strerror), []
        try:
            document = json.loads(text)
        except ValueError:
            return self._damaged(warn, "not valid JSON"), []
        if not isinstance(document, dict) or not isinstance(document.get("prompts"), list):
            return self._damaged(warn, "not a batch manifest"), []
        entries = {e["name"]: e for e in document["prompts"] if isinstance(e, dict) and isinstance(e.get("name"), str)}
        running = document.get("running")
        return entries, [h for h in running if isinstance(h, dict)] if isinstance(running, list) else []

    def _damaged(self, warn, reason: str) -> dict:
        if warn is not None:
            warn(f"warning: the manifest {self.path} is damaged ({reason}); starting it afresh")
        return {}

    def check_owner(self) -> None:
        """Refuse to overwrite the manifest of another config that has the same file name."""
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        owner = document.get("config") if isinstance(document, dict) else None
        if isinstance(owner, str) and owner != str(self.config.path):
            raise UsageError(f"the manifest {self.path} belongs to the config {owner}, not {self.config.path}: "
                             "give another --output-dir (or rename the config)")

    def _write(self, entries: dict, holders: list) -> dict:
        ordered = [entries.get(p.name) or pending_entry(p) for p in self.config.prompts]
        counts = dict(Counter(entry["status"] for entry in ordered))
        document = {
            "tool": "mask-impact", "tool_version": __version__, "config": str(self.config.path),
            "tool_kind": self.config.tool.name, "processes": self.shard.size,
            "updated_utc": _now(), "counts": counts, "running": holders, "prompts": ordered,
        }
        write_text_atomically(self.path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        return {e["name"]: e for e in ordered}

    def update(self, entries: dict) -> dict:
        """Replace this process's entries; returns the merged entries of the whole batch."""
        with self._locked():
            merged, running = self._load()
            merged.update(entries)
            return self._write(merged, running)

    def claim(self, warn) -> dict:
        """Record this process as running its share; refuse when a live process on this machine runs the
        same prompts (two runs of one config would both run everything and undo each other's statuses).
        Returns the entries found (a damaged manifest is said through `warn` and read as none)."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "rank": self.shard.rank, "size": self.shard.size,
              "started_utc": _now()}
        with self._locked():
            found, running = self._load(warn)
            here = socket.gethostname()
            holders = [h for h in running if h.get("host") != here or _alive_here(h)]  # the gone are dropped
            for h in holders:
                overlaps = h.get("size") != me["size"] or h.get("rank") == me["rank"]
                if h.get("host") == here and h.get("pid") != me["pid"] and overlaps:
                    raise UsageError(f"the batch {self.config.path.name} is already running in process {h.get('pid')} "
                                     f"(since {h.get('started_utc')}; manifest {self.path}): wait for it to finish "
                                     "or stop it, then run again with --resume")
            self._write(found, holders + [me])
            return found

    def release(self) -> None:
        with self._locked():
            entries, running = self._load()
            me = (os.getpid(), socket.gethostname())
            self._write(entries, [h for h in running if (h.get("pid"), h.get("host")) != me])


def _alive_here(holder: dict) -> bool:
    """Whether a process of this machine recorded in the manifest still runs. Processes of other machines
    are never checked, so a node that died cannot block a --resume elsewhere."""
    if not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)  # no signal: only whether it exists (PermissionError: it does, another user's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def pending_entry(prompt: BatchPrompt) -> dict:
    entry = {"name": prompt.name, "status": "pending" if prompt.enabled else "skipped",
             "settings_hash": prompt.settings_hash, "rows": None, "timings": {}, "paths": {}, "error": None}
    if prompt.settings is not None:
        entry["settings"] = prompt.settings.to_dict()
    return entry


def is_resumable(entry: dict | None, prompt: BatchPrompt) -> bool:
    """Done earlier with the same settings, and every file still there."""
    return (entry is not None and entry.get("status") == "done"
            and entry.get("settings_hash") == prompt.settings_hash
            and bool(entry.get("paths")) and all(Path(p).is_file() for p in entry["paths"].values()))


def run_batch(config: BatchConfig, resume: bool = False, log=None) -> int:
    """Run this process's prompts; returns the exit code (0 all done, 1 some failed, 130 / 143 interrupted)."""
    shard = Shard.from_environment()
    if shard.size > 1 and any(p.settings and p.settings.device_map for p in config.prompts):
        raise UsageError("--device-map spreads one model over several GPUs: run it in one process, "
                         "not under accelerate launch --num_processes")
    log = log or console.write
    manifest = Manifest(config, shard)
    manifest.check_owner()
    found = manifest.claim(warn=log)
    try:
        return _run_share(config, shard, manifest, found if resume else {}, resume, log)
    finally:
        manifest.release()


def _run_share(config: BatchConfig, shard: Shard, manifest: Manifest, previous: dict, resume: bool, log) -> int:
    mine = [p for p in config.prompts if shard.owns(p)]
    entries, todo = _plan(mine, previous, resume)
    manifest.update(entries)
    enabled = sum(1 for p in config.prompts if p.enabled)
    log(f"Batch {config.path.name}: {len(config.prompts)} prompts ({enabled} enabled), manifest {manifest.path}")
    if shard.size > 1:
        log(f"process {shard.rank + 1} of {shard.size}: {len(todo)} of {len(config.prompts)} prompts")
    elif shard.accelerate_cpu:
        log("note: accelerate started a single process (--cpu without MPI): running every prompt here")
    if resume:
        log(f"resume: {sum(1 for p in mine if p.enabled) - len(todo)} prompt(s) already done, {len(todo)} to run")

    models = ModelSlot(log)
    bar = console.progress(len(todo), "prompts", "prompt", leave=True)
    try:
        for prompt in _grouped_by_model(todo):
            entry = dict(entries[prompt.name], status="running", started_utc=_now(), process=shard.rank)
            entries[prompt.name] = entry
            manifest.update(entries)
            try:
                entry.update(_run_prompt(prompt, shard, models, log))
            except KeyboardInterrupt:
                entry["status"] = "interrupted"  # its files were never renamed into place
                raise
            finally:
                entry["finished_utc"] = _now()
                manifest.update(entries)
            bar.update(1)
    except KeyboardInterrupt as exc:
        bar.close()
        merged = manifest.read()
        print(console.batch_summary([merged[p.name] for p in mine if p.name in merged], manifest.path),
              file=sys.stderr)
        name = "terminated" if isinstance(exc, console.Terminated) else "interrupted"
        print(f"{name}: the current prompt is marked interrupted and left no file; "
              "run again with --resume to finish the batch", file=sys.stderr)
        return console.interrupt_code(exc)
    bar.close()
    merged = manifest.update(entries)
    print(console.batch_summary([merged[p.name] for p in mine], manifest.path))
    if shard.size > 1 and all(e["status"] in FINAL for e in merged.values()):
        print(console.batch_totals(list(merged.values())))
    return 1 if any(entries[p.name]["status"] == "failed" for p in mine) else 0


def _plan(mine: list, previous: dict, resume: bool) -> tuple:
    """Manifest entries for this process's prompts, and the prompts still to run."""
    entries, todo = {}, []
    for prompt in mine:
        if prompt.enabled and resume and is_resumable(previous.get(prompt.name), prompt):
            entries[prompt.name] = previous[prompt.name]
        else:
            entries[prompt.name] = pending_entry(prompt)
            if prompt.enabled:
                todo.append(prompt)
    return entries, todo


def _run_prompt(prompt: BatchPrompt, shard: Shard, models: "ModelSlot", log) -> dict:
    """One prompt, start to files; returns what its manifest entry should say."""
    import torch

    from .api import run

    settings = replace(prompt.settings, device=shard.device(prompt.settings.device))
    started = time.perf_counter()
    load_s = 0.0
    try:
        log(f"[{prompt.name}]")
        loaded, load_s = models.get(settings)
        result = run(settings, loaded=loaded, log=log)
        timings = dict(result.metadata["timings"], model_load_s=round(load_s, 4),
                       total_s=round(time.perf_counter() - started, 4))
        return {"status": "done", "rows": len(result.table), "paths": result.paths, "error": None,
                "timings": timings}
    except ModelUnavailable as exc:  # its load failed for an earlier prompt: said once already
        return {"status": "failed", "error": str(exc), "timings": {"model_load_s": 0.0, "total_s": 0.0}}
    except Exception as exc:  # noqa: BLE001 - an overnight batch records the failure and goes on
        error = f"{type(exc).__name__}: {exc}".strip()
        log(f"[{prompt.name}] failed: {error}")
        if isinstance(exc, torch.OutOfMemoryError):
            models.drop()  # free the memory for the next prompt
        return {"status": "failed", "error": error, "traceback": traceback.format_exc(limit=-8),
                "timings": {"model_load_s": round(load_s, 4), "total_s": round(time.perf_counter() - started, 4)}}


class ModelUnavailable(Exception):
    """A model whose loading already failed in this batch: its other prompts fail with the same message."""


class ModelSlot:
    """The one model held at a time: loaded on first use, reused while the key stays the same.

    A model that fails to load is tried once: every later prompt that needs it fails with
    the same error, without another attempt (a missing or unreachable model stays so).
    """

    def __init__(self, log):
        self.log = log
        self.key = None
        self.loaded = None
        self.failed = {}  # key -> error message

    def get(self, settings) -> tuple:
        """(loaded model, seconds spent loading it now: 0 when reused)."""
        key = _model_key(settings)
        if key in self.failed:
            raise ModelUnavailable(self.failed[key])
        if key == self.key:
            return self.loaded, 0.0
        self.drop()
        started = time.perf_counter()
        from .inputs import load_model

        try:
            self.loaded = load_model(settings)  # a failure leaves the slot empty
        except (UsageError, OSError, ValueError) as exc:
            self.failed[key] = f"{type(exc).__name__}: {exc}"
            self.log(f"model {settings.model} could not be loaded; its prompts fail: {exc}")
            raise ModelUnavailable(self.failed[key]) from None
        self.key = key
        self.log(console.describe_model(self.loaded))
        return self.loaded, time.perf_counter() - started

    def drop(self) -> None:
        self.key = self.loaded = None
        gc.collect()
        torch = sys.modules.get("torch")  # nothing to free when no prompt has run
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _grouped_by_model(prompts: list) -> list:
    """Prompts of the same model next to each other (first-seen order), so each model loads once."""
    order = {}
    for prompt in prompts:
        order.setdefault(_model_key(prompt.settings), len(order))
    return sorted(prompts, key=lambda p: (order[_model_key(p.settings)], p.index))


def _model_key(settings) -> tuple:
    return (settings.tool, settings.model, settings.dtype, settings.device, settings.device_map,
            settings.trust_remote_code)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
