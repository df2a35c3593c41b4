"""The command line answers --help and bad input at once: nothing heavy is imported before a run starts."""

import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli_process

FAST = 2.0  # seconds, the promise for --help and every usage error (measured: about 0.2 s)


@pytest.mark.parametrize("script", ["mask_impact_vl.py", "mask_impact_analysis.py"])
@pytest.mark.parametrize("args", [["--help"], ["--num-tokens", "0", "--prompt", "Hi"],
                                  ["--mask-unit", "region:0x2", "--prompt", "Hi"], ["--layers", "0-999999999x"]])
def test_help_and_usage_errors_answer_within_two_seconds(script, args):
    started = time.perf_counter()
    proc = run_cli_process(script, *args)
    elapsed = time.perf_counter() - started
    assert proc.returncode == (0 if args == ["--help"] else 2), proc.stderr
    assert elapsed < FAST, f"{script} {args}: {elapsed:.2f} s"


def test_parsing_a_command_line_imports_neither_torch_nor_transformers():
    code = ("import sys\n"
            "from vl_masking.cli import parse_command_line\n"
            "from vl_masking.tools import VL\n"
            "try:\n"
            "    parse_command_line(['--prompt', 'Hi', '--mask-unit', 'bogus'], VL)\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__)\n"
            "import vl_masking\n"
            "print(sorted(m for m in ('torch', 'transformers', 'pandas', 'pyarrow') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["UsageError", "[]"]


@pytest.mark.parametrize("args, warning", [
    (["--window", "5"], "--window is used by --measure flow only; ignored with --measure layer"),
    (["--measure", "flow", "--flow", "question->last", "--variants", "Full"],
     "--variants: the flow measure reads the prediction, it has no variants; ignored"),
    (["--measure", "flow", "--flow", "question->last", "--mask-span", "0-1"],
     "--mask-span makes the units of a flow from units, and no --flow has units as its source; ignored"),
])
def test_an_option_the_run_does_not_use_is_named_in_a_warning(args, warning):
    from vl_masking.cli import parse_command_line
    from vl_masking.tools import VL

    request = parse_command_line(["--prompt", "Hi", *args], VL)
    assert request.warnings == (f"warning: {warning}",)


def test_the_options_a_run_uses_give_no_warning():
    from vl_masking.cli import parse_command_line
    from vl_masking.tools import VL

    for args in (["--measure", "flow", "--window", "5", "--mask-unit", "word", "--mask-span", "0-1"],
                 ["--variants", "Full", "--mask-unit", "word"]):
        assert parse_command_line(["--prompt", "Hi", *args], VL).warnings == ()


def test_a_text_span_holding_an_arrow_is_one_side_of_a_flow():
    from vl_masking.units import FlowPair

    pair = FlowPair.parse('text:"a->b"->last')
    assert (pair.source.span.text, pair.target.name) == ("a->b", "last")
    pair = FlowPair.parse("text:'x->'->text:\"y->z\"")
    assert (pair.source.span.text, pair.target.span.text) == ("x->", "y->z")
