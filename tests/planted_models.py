"""The planted-evidence models the tests judge the measures by (vl_masking/planted.py), trained here once per
source of planted.py and cached in .cache/. Whoever asks first trains, under a lock: a test worker, or the
trainer that conftest.py starts beside the workers when the planted tests run (so that the two models train
while the other tests run, instead of a worker waiting for another's training).

    python tests/planted_models.py FAMILY [--clips]   # train FAMILY's model (then its video variant)
"""

import fcntl
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def trained(family: str, clips: bool = False) -> Path:
    """The planted model of `family`, trained here once for this source of planted.py; with clips, the Qwen3-VL
    model's video variant (trained on clips after the pictures)."""
    from vl_masking import planted

    source = hashlib.sha256((ROOT / "vl_masking" / "planted.py").read_bytes()).hexdigest()[:12]
    name = f"planted-{family}" + ("-clips" if clips else "")
    out = ROOT / ".cache" / f"{name}-{source}"
    pictures = trained(family) if clips else None
    out.parent.mkdir(exist_ok=True)
    with open(out.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "planted.json").is_file():
            if clips:
                planted.train_clips(pictures, out, log=lambda line: None)
            else:
                planted.train(out, family, log=lambda line: None)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    trained(sys.argv[1], clips="--clips" in sys.argv[2:])
