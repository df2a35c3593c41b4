"""mask-impact: which prompt tokens does each decoder layer actually use?"""

__version__ = "0.1.0"

from .api import run_masking_experiment, run_vl_masking  # noqa: E402

__all__ = ["run_masking_experiment", "run_vl_masking", "__version__"]
