"""A fixed set of runs whose files are committed under tests/data/expected/: every measure on a VL and a text
model, a batch and a study. test_expected_files.py runs them again and compares; a change of the package that
is meant to change no result must leave them equal (numbers to float32 rounding, metadata minus times and ids).

Regenerate only when a result is meant to change, and say why in the commit:
    python tests/expected_runs.py
"""

import json
import shutil
import sys
from pathlib import Path

import yaml

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EXPECTED = TESTS / "data" / "expected"
PIGGY = ROOT / "examples" / "piggy.png"

FACTS = [{"id": "f0", "subject": "Paris", "question": "Paris is the capital of", "answer": "France"},
         {"id": "f1", "subject": "the Nile", "question": "The longest river is the Nile in", "answer": "Africa"},
         {"id": "f2", "subject": "Tokyo", "question": "Tokyo is a city in", "answer": "Japan"}]


def runs(vl_dir: Path, text_dir: Path, work: Path) -> list:
    """(name, script, arguments) of each run; every run writes under work/NAME."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "facts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in FACTS))
    (work / "batch.yaml").write_text(yaml.safe_dump({
        "defaults": {"model": str(text_dir), "measure": "layer,attention", "mask_unit": "word", "num_tokens": 2},
        "prompts": [{"name": "capital", "prompt": "The capital of France is"},
                    {"name": "river", "prompt": "The longest river is", "mask_unit": "token"}]}, sort_keys=False))
    common = ["--device", "cpu", "--dtype", "float32"]
    return [
        ("vl", "mask_impact_vl.py", [
            "--model", vl_dir, "--prompt", "Describe this image.", "--image", PIGGY, "--num-tokens", 2,
            "--mask-mode", "both", "--mask-unit", "region:2x2", "--measure", "layer,attention,flow",
            "--flow", "image->question", "--flow", "units->last", "--window", 2, "--formats", "parquet,csv",
            "--output", "vl", *common]),
        ("text", "mask_impact_analysis.py", [
            "--model", text_dir, "--prompt", "The capital of France is", "--mask-unit", "word", "--num-tokens", 2,
            "--measure", "layer,attention,flow", "--flow", 'text:"France"->last', "--flow", "units->last",
            "--window", 1, "--formats", "parquet", "--output", "text", *common]),
        ("batch", "mask_impact_analysis.py", ["--config", work / "batch.yaml", "--formats", "parquet", *common]),
        ("study", "mask_impact_analysis.py", [
            "--model", text_dir, "--dataset", work / "facts.jsonl", "--columns", "id=id,question=question,answer=answer",
            "--measure", "layer,flow", "--flow", 'text:"{subject}"->last', "--flow", "question->last", "--window", 1,
            "--target", "answer", "--output", "study", *common]),
    ]


def produce(vl_dir: Path, text_dir: Path, work: Path, run_cli) -> Path:
    """Run every run (run_cli(script, *args, cwd=...)) and return the directory of their outputs."""
    for name, script, args in runs(vl_dir, text_dir, work):
        out = work / name
        proc = run_cli(script, *args, "--output-dir", out, cwd=work)
        if proc.returncode != 0:
            raise AssertionError(f"{name}: {script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return work


def result_files(directory: Path) -> list:
    """The files compared: every Parquet and CSV table and CSV metadata, relative to directory."""
    return sorted(p.relative_to(directory) for p in directory.rglob("*")
                  if p.suffix in (".parquet", ".csv") or p.name.endswith(".meta.json"))


def main() -> None:
    sys.path.insert(0, str(TESTS))
    from conftest import run_cli  # noqa: E402  (sets the thread count the tests use)

    from vl_masking.tiny_models import build_causal_lm, build_qwen3_vl

    work = EXPECTED.parent / "expected-work"
    shutil.rmtree(work, ignore_errors=True)
    vl = build_qwen3_vl(work / "models" / "tiny-qwen3-vl", layers=3)
    text = build_causal_lm(work / "models" / "tiny-qwen3", model_type="qwen3")
    produce(vl, text, work / "runs", run_cli)
    shutil.rmtree(EXPECTED, ignore_errors=True)
    for rel in result_files(work / "runs"):
        target = EXPECTED / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "runs" / rel, target)
    shutil.rmtree(work)
    print(f"wrote {len(result_files(EXPECTED))} files under {EXPECTED}")


if __name__ == "__main__":
    main()
