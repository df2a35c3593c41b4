"""mask-impact: which prompt tokens does each decoder layer actually use?

The API functions are imported on first use, so that `import vl_masking` (and the
command line's --help and usage errors) does not pay for torch and transformers.
"""

__version__ = "0.2.0"
__all__ = ["run_masking_experiment", "run_vl_masking", "run_study", "__version__"]


def __getattr__(name):
    if name in ("run_masking_experiment", "run_vl_masking"):
        from . import api

        return getattr(api, name)
    if name == "run_study":
        from . import study_run

        return study_run.run_study
    raise AttributeError(f"module 'vl_masking' has no attribute {name!r}")
