"""The command line of both tools: arguments -> one validated run, or a batch from a config file.

Imports nothing heavy: `--help` and every usage error answer before torch or
transformers is loaded; `run` and `run_batch` import them when a run starts.

The commands (pyproject's console scripts; the repository's scripts and `python -m vl_masking` call the
same functions): `mask-impact-vl` (vision-language models), `mask-impact` (causal LMs) and
`mask-impact-figures`.
"""

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from .batch_config import BatchConfig, load_batch
from .errors import UsageError
from .fields import flag_of
from .options import (DEVICE_MAP_STRATEGIES, BatchOptions, RunSettings, _resolve, build_parser, explicit_options,
                      flag, settings_from_values, unused_options)
from .tools import Tool


@dataclass
class CommandLine:
    """What a command line asks for: one run (settings) or a batch from a config file."""

    settings: RunSettings | None = None
    batch: BatchConfig | None = None
    study: object = None  # study.Study, from --dataset
    resume: bool = False
    warnings: tuple = ()  # options given that the run does not use


def parse_command_line(argv, tool: Tool, prog: str | None = None) -> CommandLine:
    """Parse and validate a command line; with --config, the whole config file (every problem at once)."""
    parser = build_parser(tool, prog)
    argv = _values_that_start_with_a_dash(list(argv), parser)
    args = parser.parse_args(argv)
    source = "--config" if args.config is not None else "--dataset" if args.dataset is not None else None
    if args.config is not None and args.dataset is not None:
        raise UsageError("--config and --dataset are two batches: give one")
    for f in fields(BatchOptions):  # --limit needs --dataset, --resume needs --config or --dataset
        needs = f.metadata["needs"]
        if needs and getattr(args, f.name) not in (None, False) and all(getattr(args, n) is None for n in needs):
            raise UsageError(f"{flag_of(f)} needs {' or '.join(flag(n) for n in needs)}")
    given = explicit_options(parser, argv)
    if source is None:
        settings = settings_from_values(vars(args), base_dir=Path.cwd())
        return CommandLine(settings=settings, warnings=tuple(unused_options(settings, given)))
    for key in ("prompt", "prompt_file", "image", "output"):
        if key in given and not (key == "output" and args.dataset is not None):  # --output names a study
            raise UsageError(f"--{key.replace('_', '-')} cannot be combined with {source} "
                             "(prompts, images and names come from the file)")
    for key in ("output_dir", "device_map"):
        if key in given and not (key == "device_map" and given[key] in DEVICE_MAP_STRATEGIES):
            given[key] = str(_resolve(Path.cwd(), given[key]))
    if args.dataset is not None:
        from .dataset import load_dataset

        study = load_dataset(args.dataset, tool, given, columns=args.columns, template=args.prompt_template,
                             limit=args.limit, sample=args.sample, seed=args.seed, where=args.where,
                             only_correct=bool(args.only_correct))
        return CommandLine(study=study, resume=args.resume, warnings=study.warnings)
    batch = load_batch(args.config, tool, overrides=given)
    return CommandLine(batch=batch, resume=args.resume, warnings=batch.warnings)


def run(settings: RunSettings):
    """Load, analyse and write one run (torch and transformers are imported here, not before)."""
    from .api import run as run_settings

    return run_settings(settings)


def run_batch(config: BatchConfig, resume: bool) -> int:
    """Every prompt of a config file; returns the exit code."""
    from .batch import run_batch as run_config

    return run_config(config, resume=resume)


def _shard():
    from .shard import Shard

    return Shard.from_environment()


def _values_that_start_with_a_dash(argv: list, parser) -> list:
    """`--flow "->"` or `--prompt -x`: argparse takes a value that starts with '-' for an option and says
    "expected one argument"; a value that is no option name is joined to its option (`--flow=->`)."""
    import argparse

    names = set(parser._option_string_actions)
    takes_value = {name for name, action in parser._option_string_actions.items()
                   if type(action) in (argparse._StoreAction, argparse._AppendAction) and action.nargs is None}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] not in names:
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(tool: Tool, argv=None, prog: str | None = None) -> None:
    """One tool's command: bad input is one line on stderr and exit 2; Ctrl-C / SIGTERM leave no partial
    file (exit 130 / 143)."""
    from .console import cli_errors, summary

    with cli_errors():
        request = parse_command_line(sys.argv[1:] if argv is None else argv, tool, prog)  # before torch loads
        for warning in request.warnings:
            print(warning, file=sys.stderr)
        if request.batch is not None:  # every prompt of the config file, then the summary table
            sys.exit(run_batch(request.batch, resume=request.resume))
        if request.study is not None:  # every example of the table, into one directory
            from .study import check_ownership
            from .study_run import run_examples

            check_ownership(request.study, request.resume, _shard())  # before torch loads
            sys.exit(run_examples(request.study, resume=request.resume))
        print(summary(run(request.settings)))  # load, analyse, write; then the summary


def vl_command() -> None:
    from .tools import VL

    main(VL, prog="mask-impact-vl")


def text_command() -> None:
    from .tools import TEXT

    main(TEXT, prog="mask-impact")


def figures_command() -> None:
    from .figures import command

    command(prog="mask-impact-figures")
