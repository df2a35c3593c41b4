"""Batches and studies run through one runner: one manifest format (each rank's part, the merged file) and one
locking policy (an flock per rank, the same refusal line for both)."""

import fcntl
import json
import os

import yaml

from conftest import run_cli

PROMPTS = [("eiffel", "The Eiffel Tower is located in the city of"), ("prado", "The Prado is located in")]
ENTRY_KEYS = {"name", "status", "rows", "error", "timings", "started_utc", "finished_utc", "updated_utc", "process"}


def batch_and_study(model, tmp_path):
    """A two-prompt batch and the same two prompts as a study; (batch manifest, its parts, study's, its parts)."""
    (tmp_path / "facts.yaml").write_text(yaml.safe_dump({
        "defaults": {"model": str(model), "num_tokens": 1, "formats": "parquet", "output_dir": "out"},
        "prompts": [{"name": n, "prompt": p} for n, p in PROMPTS]}))
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps({"id": n, "question": p}) + "\n" for n, p in PROMPTS))
    run_cli("mask_impact_analysis.py", "--config", tmp_path / "facts.yaml", "--device", "cpu", check=True)
    run_cli("mask_impact_analysis.py", "--model", model, "--dataset", tmp_path / "facts.jsonl", "--columns",
            "id=id,question=question", "--num-tokens", 1, "--device", "cpu", "--output-dir", tmp_path / "out",
            check=True)
    return (tmp_path / "out" / "facts.batch.json", tmp_path / "out" / "facts.batch",
            tmp_path / "out" / "facts" / "_manifest.json", tmp_path / "out" / "facts" / "_manifest")


def test_a_batch_and_a_study_write_one_manifest_format(tiny_text_dir, tmp_path):
    batch, batch_parts, study, study_parts = batch_and_study(tiny_text_dir, tmp_path)
    merged = {"batch": json.loads(batch.read_text()), "study": json.loads(study.read_text())}
    own = {"batch": {"config", "tool_kind", "prompts"}, "study": {"table", "directories", "examples"}}
    assert {k: set(d) - own[k] for k, d in merged.items()} == {
        k: {"tool", "tool_version", "processes", "updated_utc", "counts"} for k in merged}
    entries = {"batch": merged["batch"]["prompts"], "study": merged["study"]["examples"]}
    for kind, listed in entries.items():
        assert [e["name"] for e in listed] == [n for n, _ in PROMPTS], kind
        assert all(ENTRY_KEYS <= set(e) and e["status"] == "done" for e in listed), (kind, listed)
        assert merged[kind]["counts"] == {"done": 2}
    for kind, parts in (("batch", batch_parts), ("study", study_parts)):
        assert sorted(p.name for p in parts.iterdir()) == ["rank-00000.json", "rank-00000.lock"], kind
        part = json.loads((parts / "rank-00000.json").read_text())
        assert {k for k in part if k not in ("prompts", "examples")} == {"rank", "processes", "updated_utc"}


def test_a_rank_held_by_another_process_is_refused_the_same_way_in_a_batch_and_a_study(tiny_text_dir, tmp_path):
    batch, batch_parts, study, study_parts = batch_and_study(tiny_text_dir, tmp_path)
    runs = {"batch": ["--config", tmp_path / "facts.yaml", "--device", "cpu", "--resume"],
            "study": ["--model", tiny_text_dir, "--dataset", tmp_path / "facts.jsonl", "--columns",
                      "id=id,question=question", "--num-tokens", 1, "--device", "cpu", "--output-dir",
                      tmp_path / "out", "--resume"]}
    for kind, noun, parts in (("batch", "prompt", batch_parts), ("study", "example", study_parts)):
        fd = os.open(parts / "rank-00000.lock", os.O_RDWR)  # this test process holds the rank
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            before = {p.name: p.read_bytes() for p in parts.parent.rglob("*.json")}
            proc = run_cli("mask_impact_analysis.py", *runs[kind])
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (kind, proc.stderr)
            assert " is already running (" in proc.stderr and "--resume" in proc.stderr, proc.stderr
            assert {p.name: p.read_bytes() for p in parts.parent.rglob("*.json")} == before  # nothing touched
        finally:
            os.close(fd)  # the lock goes with the descriptor
        proc = run_cli("mask_impact_analysis.py", *runs[kind])
        assert proc.returncode == 0 and f"2 {noun}(s) already done, 0 to run" in proc.stdout, proc.stderr
