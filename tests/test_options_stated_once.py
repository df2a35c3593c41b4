"""An option is one field: a field added to the settings (here, in this file) reaches a run's settings from the
command line, a config file, a study and the API, with its type, choices and check, and no other edit; the
option table of docs/options.md lists exactly the fields' flags and their choices."""

import re
from dataclasses import dataclass, fields

import pytest
import yaml

import vl_masking.api as api
from conftest import ROOT
from vl_masking import options
from vl_masking.batch_config import load_batch
from vl_masking.cli import parse_command_line
from vl_masking.dataset import load_dataset
from vl_masking.errors import UsageError
from vl_masking.fields import choices_of, flag_of, option
from vl_masking.tools import TEXT


@dataclass
class WithSeedOffset(options.CommonSettings):
    seed_offset: int = option(0, "added to every seed", type=int,
                              check=lambda n: options._require(n < 100, "--seed-offset must be below 100"))
    pooling: str = option("mean", "how to pool: {choices}", choices=("mean", "max"))
    anchors: tuple = option((), "an anchor; repeatable", kind="repeat", flag="--anchor")


@pytest.fixture()
def new_options(monkeypatch, tmp_path):
    """RunSettings with three new options, as if they were written into CommonSettings; a model directory."""
    monkeypatch.setattr(options, "RunSettings", options.settings_class(WithSeedOffset))
    (tmp_path / "model").mkdir()
    return tmp_path / "model"


def test_an_option_added_to_the_settings_reaches_them_from_the_command_line(new_options):
    line = parse_command_line(["--model", str(new_options), "--prompt", "hi", "--seed-offset", "7", "--pooling", "max",
                               "--anchor", "a", "--anchor", "b"], TEXT)
    assert (line.settings.seed_offset, line.settings.pooling, line.settings.anchors) == (7, "max", ("a", "b"))
    assert parse_command_line(["--model", str(new_options), "--prompt", "hi"], TEXT).settings.seed_offset == 0
    with pytest.raises(UsageError, match="unknown --pooling 'median' \\(choose from mean, max\\)"):
        parse_command_line(["--model", str(new_options), "--prompt", "hi", "--pooling", "median"], TEXT)
    with pytest.raises(UsageError, match="--seed-offset must be below 100"):
        parse_command_line(["--model", str(new_options), "--prompt", "hi", "--seed-offset", "100"], TEXT)


def test_an_option_added_to_the_settings_reaches_them_from_a_config_file(new_options, tmp_path):
    config = tmp_path / "batch.yaml"
    config.write_text(yaml.safe_dump({"defaults": {"model": str(new_options), "seed_offset": 7, "anchor": "a"},
                                      "prompts": [{"name": "one", "prompt": "hi"},
                                                  {"name": "two", "prompt": "ho", "seed_offset": 9,
                                                   "anchors": ["b", "c"], "pooling": "max"}]}))
    one, two = (p.settings for p in load_batch(config, TEXT).prompts)
    assert (one.seed_offset, one.anchors, one.pooling) == (7, ("a",), "mean")
    assert (two.seed_offset, two.anchors, two.pooling) == (9, ("b", "c"), "max")
    config.write_text(yaml.safe_dump({"defaults": {"model": str(new_options), "seed_offset": "seven"},
                                      "prompts": [{"name": "one", "prompt": "hi"}]}))
    with pytest.raises(UsageError, match="seed_offset: expected a whole number"):
        load_batch(config, TEXT)


def test_an_option_added_to_the_settings_reaches_them_from_a_study(new_options, tmp_path):
    table = tmp_path / "facts.jsonl"
    table.write_text('{"id": "a", "question": "Paris is in"}\n')
    study = load_dataset(table, TEXT, {"model": str(new_options), "seed_offset": 7, "anchors": ["x"]},
                         columns="id=id,question=question")
    assert (study.examples[0].settings.seed_offset, study.examples[0].settings.anchors) == (7, ("x",))


def test_an_option_added_to_the_settings_reaches_them_from_the_api(new_options, monkeypatch):
    seen = []

    def run(settings, **_kwargs):
        seen.append(settings)
        raise KeyboardInterrupt  # the settings are all this test needs

    monkeypatch.setattr(api, "run", run)
    with pytest.raises(KeyboardInterrupt):
        api.run_masking_experiment("hi", model=str(new_options), seed_offset=7, anchors=["a"], pooling="max")
    assert (seen[0].seed_offset, seen[0].anchors, seen[0].pooling) == (7, ("a",), "max")
    with pytest.raises(TypeError, match="seed_offst"):
        api.run_masking_experiment("hi", model=str(new_options), seed_offst=7)


def readme_option_rows() -> dict:
    """{flag: the rest of its row} of the option table in the documentation."""
    text = (ROOT / "docs" / "options.md").read_text()
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| `(--[a-z-]+)", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_the_option_table_lists_every_flag_and_every_choice():
    rows = readme_option_rows()
    flags = {flag_of(f): f for f in [*options.option_fields(), *fields(options.BatchOptions)]}
    assert set(rows) == set(flags)
    for flag, f in flags.items():
        for choice in choices_of(f):
            assert f"`{choice}`" in rows[flag], (flag, choice)
