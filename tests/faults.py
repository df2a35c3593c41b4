"""Runs an entry script in a real process that signals or kills itself at one exact point of its work, so that
tests can put a real SIGTERM or SIGKILL where a timer could only hit by luck:

    python tests/faults.py FAULT SCRIPT ARGS...

FAULT:
  kill-before-second-measure-chunk  SIGKILL just before the second measure's chunk of a study flush is renamed
                                    into place (the first measure's chunk is already there)
  term-between-measure-writes       SIGTERM right after a single run renames its first result file into place
  term-twice                        SIGTERM once the second example of a study has finished, and a second
                                    SIGTERM while the first one's flush writes what finished

Nothing of the tool is replaced: the patches only wrap os.replace and pyarrow's write_table with a signal.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def kill_before_second_measure_chunk():
    replace = os.replace
    seen = set()

    def patched(src, dst, *args, **kwargs):
        dst = Path(dst)
        if dst.name.startswith("chunk-") and dst.suffix == ".parquet":
            seen.add(dst.parent)
            if len(seen) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = patched


def term_between_measure_writes():
    replace = os.replace
    sent = []

    def patched(src, dst, *args, **kwargs):
        out = replace(src, dst, *args, **kwargs)
        if not sent and Path(dst).suffix == ".parquet" and not Path(dst).name.startswith("."):
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    os.replace = patched


def term_twice():
    import pyarrow.parquet as pq

    from vl_masking import runner

    progress_line = runner.progress_line
    write_table = pq.write_table
    first = []

    def progress(plural, done, *args, **kwargs):
        if done == 2 and not first:
            first.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return progress_line(plural, done, *args, **kwargs)

    def write(*args, **kwargs):
        if first and len(first) == 1:
            first.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # the second signal, while the first one's flush writes
        return write_table(*args, **kwargs)

    runner.progress_line = progress
    pq.write_table = write


FAULTS = {"kill-before-second-measure-chunk": kill_before_second_measure_chunk,
          "term-between-measure-writes": term_between_measure_writes, "term-twice": term_twice}

if __name__ == "__main__":
    fault, script, *args = sys.argv[1:]
    FAULTS[fault]()
    sys.argv = [str(ROOT / script), *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")
