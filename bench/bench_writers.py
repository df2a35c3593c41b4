"""Benchmark: writing a full-size result (about 3.8 million rows) in each format.

The table has the shape of a Qwen3-VL-4B run on a 1024x1024 image (1040 positions,
36 layers, 34 variants, 3 steps). Each format is written alone, with the tool's own
atomic writer, and timed; prints JSON.

    .venv/bin/python bench/bench_writers.py [--json bench/results/writers_cpu_3.8M_rows.json]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import cpu_name  # noqa: E402
from bench_viewers import synthetic_table  # noqa: E402
from vl_masking.options import output_paths  # noqa: E402
from vl_masking.results import write_results  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--positions", type=int, default=1040)
    args = parser.parse_args(argv)
    table, meta = synthetic_table(positions=args.positions)
    result = {"machine": cpu_name(), "cpu_count": os.cpu_count(),
              "rows": len(table)}
    with tempfile.TemporaryDirectory() as out:
        for fmt in ("parquet", "csv", "json"):
            started = time.perf_counter()
            write_results(table, dict(meta), out, "bench", (fmt,))
            result[f"{fmt}_write_s"] = round(time.perf_counter() - started, 2)
            result[f"{fmt}_mb"] = round(os.path.getsize(output_paths(out, "bench", (fmt,))[fmt]) / 1e6, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
