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
     "--variants is used by --measure layer only; ignored with --measure flow"),
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
    from vl_masking.flow_groups import FlowPair

    pair = FlowPair.parse('text:"a->b"->last')
    assert (pair.source.span.text, pair.target.name) == ("a->b", "last")
    pair = FlowPair.parse("text:'x->'->text:\"y->z\"")
    assert (pair.source.span.text, pair.target.span.text) == ("x->", "y->z")


@pytest.mark.parametrize("tool_name", ["vl", "text"])
def test_every_option_default_is_the_same_from_the_command_line_a_config_and_the_api(tool_name, tmp_path,
                                                                                      monkeypatch):
    """Each default is stated once (on its RunSettings field): a run given only a prompt has the same settings
    from the parser, from a config file without defaults, and from the API, and they are the field defaults
    (the tool's own where an option has one per tool)."""
    import yaml

    from vl_masking.api import _settings
    from vl_masking.batch_config import load_batch
    from vl_masking.cli import parse_command_line
    from vl_masking.options import RunSettings, option_fields
    from vl_masking.tools import TOOLS

    monkeypatch.chdir(tmp_path)
    tool = TOOLS[tool_name]
    cli = parse_command_line(["--prompt", "Hi", "--output", "one"], tool).settings
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"prompts": [{"name": "one", "prompt": "Hi"}]}))
    batch = load_batch(config, tool).prompts[0].settings
    api, _ = _settings(tool, {"prompt": "Hi", "output": "one"})
    per_tool = {f.name: getattr(tool, f.metadata["per_tool"]) for f in option_fields() if f.metadata["per_tool"]}
    expected = RunSettings(prompt="Hi", tool=tool_name, output="one", output_dir=str(tmp_path / "output"),
                           **{k: v for k, v in per_tool.items() if k != "output"})
    assert cli == batch == api == expected
    assert {"window", "num_tokens", "variants", "formats", "memory_budget_mb"} <= {f.name for f in option_fields()}
