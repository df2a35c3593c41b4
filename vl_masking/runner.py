"""The one runner of batches and studies: this process's share of a list of items (a config's prompts, a
table's examples) run one after the other through the engine, with one manifest format and one locking policy.

A batch (batch.py) and a study (study_run.py) are each a `Job`: the items, what one item's run records, and
where its results go (a batch: each prompt's own files; a study: rows held and written as chunks). The loop,
the manifest, the lock, `--resume`, Ctrl-C and SIGTERM, the progress lines and the model held between items
are here, once.

The manifest, for either kind:

    PARTS/rank-00000.json    rank 0's entries: written by rank 0 only, atomically, after each item
    PARTS/rank-00000.lock    held (flock) by the process that runs rank 0
    MERGED                   every rank's entries merged, in the items' order, with the counts: written when a
                             single process ends its share (or is stopped), and in a sharded run by the rank
                             that finds every item settled, so that the file never goes back in time

    batch: MERGED = OUTPUT_DIR/CONFIG.batch.json, PARTS = OUTPUT_DIR/CONFIG.batch/
    study: MERGED = NAME/_manifest.json,          PARTS = NAME/_manifest/

An entry: name, status, timings, rows, error (and a traceback), updated_utc, and what its job adds. Statuses:
pending, running, done, failed, interrupted; a batch adds skipped (a disabled prompt), a study excluded
(--only-correct). A study's example whose rows are still held in memory is recorded as running: a kill
loses it, and --resume runs it again.

The locking policy: a process holds an exclusive flock on its rank's lock file while it runs its share. The
kernel releases it when the process ends, however it ends, so a dead process never blocks a --resume and no
process id is ever checked. A second process on the same rank (a --resume started while the first still
runs) is refused in one line naming the first, before its model loads. No other file is written by two
processes: each rank writes its own part and its own results, and the merged file is replaced atomically.
On a file system without locks (some cluster file systems) a warning says that nothing stops a second process.
"""

import gc
import json
import os
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from . import __version__, console
from .errors import UsageError
from .results import signals_ignored, write_text_atomically
from .shard import Shard


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Manifest:
    """A job's manifest: this rank's part and lock, every rank's parts merged (the format above)."""

    def __init__(self, merged: Path, parts: Path, items_key: str, shard: Shard):
        self.path = Path(merged)
        self.parts = Path(parts)
        self.items_key = items_key  # "prompts" or "examples": what the merged file lists
        self.shard = shard
        self.part = self.parts / f"rank-{shard.rank:05d}.json"

    @contextmanager
    def lock(self, what: str):
        """This rank, held by this process until it ends (the locking policy above). what: "the batch X"."""
        import fcntl

        self.parts.mkdir(parents=True, exist_ok=True)
        path = self.parts / f"rank-{self.shard.rank:05d}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                raise UsageError(f"{what} is already running ({holder}): wait for it to finish or stop it, then "
                                 "run again with --resume") from None
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks
                print(f"warning: {self.parts}: the file system has no locks ({exc.strerror}): make sure no other "
                      "process runs this rank", file=sys.stderr)
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {now_utc()}".encode(), 0)
            yield
        finally:
            os.close(fd)

    def write_part(self, entries: dict) -> None:
        """This rank's entries (a study's rows held in memory are not written yet: recorded as running)."""
        document = {"rank": self.shard.rank, "processes": self.shard.size, "updated_utc": now_utc(),
                    self.items_key: [dict(e, status="running" if e["status"] == "held" else e["status"])
                                     for e in entries.values()]}
        self.parts.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.part, json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")

    def recorded(self, warn=None) -> dict:
        """name -> the newest entry recorded: the merged file's, then every part's (a part is newer where its
        entry's updated_utc is). A damaged file is said once through `warn` and read as none."""
        latest = {}
        for path in [self.path, *sorted(self.parts.glob("rank-*.json"))]:
            for entry in self._entries(path, warn):
                name = entry.get("name")
                if name not in latest or str(entry.get("updated_utc", "")) >= str(latest[name].get("updated_utc", "")):
                    latest[name] = entry
        return latest

    def _entries(self, path: Path, warn) -> list:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            return self._damaged(path, warn, getattr(exc, "strerror", None) or "not valid JSON")
        items = document.get(self.items_key) if isinstance(document, dict) else None
        if not isinstance(items, list):
            return self._damaged(path, warn, "not a manifest")
        return [e for e in items if isinstance(e, dict) and isinstance(e.get("name"), str)]

    @staticmethod
    def _damaged(path: Path, warn, reason: str) -> list:
        if warn is not None:
            warn(f"warning: the manifest {path} is damaged ({reason}); its entries are read as none")
        return []

    def owner(self, key: str):
        """What the merged file says under key (the config or table that made it); None when there is none."""
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return document.get(key) if isinstance(document, dict) else None

    def write_merged(self, header: dict, entries: list) -> None:
        counts = {}
        for entry in entries:
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        document = {"tool": "mask-impact", "tool_version": __version__, **header, "processes": self.shard.size,
                    "updated_utc": now_utc(), "counts": counts, self.items_key: entries}
        write_text_atomically(self.path, json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")


class Job:
    """What a kind of run declares to the runner. Items have .index (their rank is index mod WORLD_SIZE) and
    .name; entries are dicts (the manifest's format above)."""

    kind = "run"  # "batch" / "study"
    noun = "item"  # "prompt" / "example"
    plural = "items"
    settled = ("done", "failed")  # statuses that end an item: a merged manifest is final when all are
    kept_note = ""  # what an interrupted run keeps, for its last line

    def __init__(self, items: list, merged: Path, parts: Path, shard: Shard):
        self.items = items
        self.manifest = Manifest(merged, parts, self.plural, shard)  # the merged file lists the items by plural

    def title(self) -> str:  # the first line
        raise NotImplementedError

    def what(self) -> str:  # "the batch X": a refusal names it
        raise NotImplementedError

    def header(self) -> dict:  # the merged manifest's own keys
        return {}

    def prepare(self, shard: Shard) -> None:
        """Under the lock, before any item: tidy what a killed run left."""

    def fresh(self, item) -> dict:
        return {"name": item.name, "status": "pending"}

    def to_run(self, item, entry: dict | None, resume: bool) -> bool:
        """Whether item runs (entry: what the manifest recorded, for a --resume)."""
        return not (resume and entry is not None and entry.get("status") == "done")

    def reconcile(self, entries: list) -> list:
        """The merged entries checked against what the results hold (a study's data files are its record)."""
        return entries

    def order(self, todo: list) -> list:
        return todo

    def run(self, item, models: "ModelSlot", shard: Shard, log) -> dict:
        """One item, start to results; returns what its entry says (status done, held, excluded...). An
        exception fails the item (recorded with its error) and the job goes on."""
        raise NotImplementedError

    def after(self, entries: dict) -> None:
        """After each item: a study writes what it holds when it has held enough."""

    def finish(self, entries: dict, stopped: bool) -> None:
        """At the end of the share, and on a stop (Ctrl-C, SIGTERM): what is held is written (its entries
        become done)."""

    def summary(self, merged: list, mine: set, shard: Shard) -> str:
        raise NotImplementedError


def run_items(job: Job, resume: bool = False, log=None, preloaded: tuple | None = None) -> int:
    """Run this process's share of job's items; returns the exit code (0 all done, 1 some failed, 130 / 143
    stopped). preloaded: (settings, model loaded for them: its tokenizer at least), reused while it fits."""
    shard = job.manifest.shard
    log = log or console.write
    with job.manifest.lock(job.what()):
        job.prepare(shard)
        mine = [item for item in job.items if shard.owns(item)]
        previous = {}
        if resume:
            recorded = job.manifest.recorded(warn=log)
            previous = {e["name"]: e for e in job.reconcile([recorded.get(i.name) or job.fresh(i) for i in mine])}
        entries, todo = {}, []
        for item in mine:
            if not job.to_run(item, previous.get(item.name), resume):
                entries[item.name] = previous[item.name]
                continue
            entries[item.name] = job.fresh(item)
            if entries[item.name]["status"] == "pending":  # not a disabled prompt
                todo.append(item)
        job.manifest.write_part(entries)
        log(job.title())
        if shard.size > 1:
            log(f"process {shard.rank + 1} of {shard.size}: {len(todo)} of {len(job.items)} {job.plural}")
        elif shard.accelerate_cpu:
            log(f"note: accelerate started a single process (--cpu without MPI): running every {job.noun} here")
        if resume:
            log(f"resume: {len(mine) - len(todo) - _count(entries, 'skipped')} {job.noun}(s) already done, "
                f"{len(todo)} to run")
        code = _run_share(job, shard, entries, todo, ModelSlot(log, job.plural, preloaded), log)
        merged = settle(job)
        if code in (0, 1):
            print(job.summary(merged, {i.name for i in mine}, shard))
        return code


def _count(entries: dict, status: str) -> int:
    return sum(1 for e in entries.values() if e["status"] == status)


def _run_share(job: Job, shard: Shard, entries: dict, todo: list, models: "ModelSlot", log) -> int:
    started, done = time.monotonic(), 0
    try:
        for item in job.order(todo):
            entry = entries[item.name]
            entry.update(status="running", started_utc=now_utc(), updated_utc=now_utc(), process=shard.rank)
            job.manifest.write_part(entries)
            try:
                entry.update(_run_one(job, item, models, shard, log))
            finally:  # a stop inside the item leaves it running: marked interrupted below
                entry["finished_utc"] = entry["updated_utc"] = now_utc()
            done += 1
            job.after(entries)
            job.manifest.write_part(entries)
            log(progress_line(job.plural, done, len(todo), started, item.name, entry))
        job.finish(entries, stopped=False)
        job.manifest.write_part(entries)
    except KeyboardInterrupt as exc:
        with signals_ignored():  # a second Ctrl-C or SIGTERM must not cut short the write of what finished
            job.finish(entries, stopped=True)
            for entry in entries.values():
                if entry["status"] in ("running", "held"):
                    entry["status"] = "interrupted"
            job.manifest.write_part(entries)
            merged = settle(job)
            name = "terminated" if isinstance(exc, console.Terminated) else "interrupted"
            print(job.summary(merged, set(entries), shard), file=sys.stderr)
            print(f"{name}: {job.kept_note}; run again with --resume to finish the {job.kind}",
                  file=sys.stderr)
        return console.interrupt_code(exc)
    return 1 if any(entries[i.name]["status"] == "failed" for i in todo) else 0


def _run_one(job: Job, item, models: "ModelSlot", shard: Shard, log) -> dict:
    """One item through the job; a failure is its entry (the run goes on), an out-of-memory error frees the
    model for the next item."""
    started = time.perf_counter()
    try:
        return job.run(item, models, shard, log)
    except ModelUnavailable as exc:  # its load failed for an earlier item: said once already
        return {"status": "failed", "error": str(exc), "timings": {"model_load_s": 0.0, "total_s": 0.0}}
    except Exception as exc:  # noqa: BLE001 - an overnight run records the failure and goes on
        error = f"{type(exc).__name__}: {exc}".strip()
        log(f"[{item.name}] failed: {error}")
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(exc, torch.OutOfMemoryError):
            models.drop()
        return {"status": "failed", "error": error, "traceback": traceback.format_exc(limit=-8),
                "timings": {"total_s": round(time.perf_counter() - started, 4)}}


def settle(job: Job) -> list:
    """Every rank's entries merged and reconciled; the merged file written when this process is the only one,
    or when every item is settled (a rank that ends while another still runs leaves it to that one)."""
    recorded = job.manifest.recorded()
    entries = job.reconcile([recorded.get(item.name) or job.fresh(item) for item in job.items])
    if job.manifest.shard.size == 1 or all(e["status"] in job.settled for e in entries):
        job.manifest.write_merged(job.header(), entries)
    return entries


def progress_line(plural: str, done: int, total: int, started: float, name: str, entry: dict) -> str:
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    status = {"held": "done"}.get(entry["status"], entry["status"])
    detail = f"{entry.get('rows', 0)} rows" if status == "done" else (entry.get("reason") or entry.get("error") or "")
    return (f"{plural}: {done}/{total} | {name}: {status} ({str(detail).splitlines()[0] if detail else ''}) | "
            f"{rate * 3600:.0f} {plural}/hour, ETA {_clock(eta)}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ModelUnavailable(Exception):
    """A model whose loading already failed in this run: its other items fail with the same message."""


class ModelSlot:
    """The one model held at a time: loaded on first use, reused while its key stays the same.

    A model that fails to load is tried once: every later item that needs it fails with the same
    error, without another attempt (a missing or unreachable model stays so). `preloaded`: a model
    already loaded, with its settings (a study's tokenizer, read to check every prompt first); its
    weights load when the first item needs them.
    """

    def __init__(self, log, plural: str = "items", preloaded: tuple | None = None):
        self.log, self.plural = log, plural
        self.key, self.loaded = (None, None) if preloaded is None else (model_key(preloaded[0]), preloaded[1])
        self.failed = {}  # key -> error message

    def get(self, settings) -> tuple:
        """(loaded model, seconds spent loading it now: 0 when reused)."""
        key = model_key(settings)
        if key in self.failed:
            raise ModelUnavailable(self.failed[key])
        if key == self.key and self.loaded.model is not None:
            return self.loaded, 0.0
        from .inputs import load_model, load_weights

        started = time.perf_counter()
        try:
            if key == self.key:
                load_weights(self.loaded, settings)
            else:
                self.drop()
                self.loaded = load_model(settings)  # a failure leaves the slot empty
        except (UsageError, OSError, ValueError) as exc:
            self.drop()
            self.failed[key] = f"{type(exc).__name__}: {exc}"
            self.log(f"model {settings.model} could not be loaded; its {self.plural} fail: {exc}")
            raise ModelUnavailable(self.failed[key]) from None
        self.key = key
        self.log(console.describe_model(self.loaded))
        return self.loaded, time.perf_counter() - started

    def drop(self) -> None:
        self.key = self.loaded = None
        gc.collect()
        torch = sys.modules.get("torch")  # nothing to free when no item has run
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def model_key(settings) -> tuple:
    """What makes two runs need a different model in memory."""
    return (settings.tool, settings.model, settings.dtype, settings.device, settings.device_map,
            settings.trust_remote_code)
