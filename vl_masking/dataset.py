"""A dataset table -> a batch of prompts (one per example), run like a --config batch.

    mask_impact_vl.py --dataset gqa.csv --columns id=qid,image=img,question=q \
        --prompt-template "{question} Answer the question using a single word or phrase." --limit 100

The table is a CSV, a JSON Lines file or a Parquet file. `--columns` maps the tool's fields to the
table's columns: `id` (each example's name; default the row number), `image` (a path, relative to the
table's directory; the VL tool), `question` (the prompt's text, unless a template is given), `answer`
(with `--target answer`, the flow measure reads the probability of the answer's first token, the text
tokenized as the table has it), and any other name a template uses (by default every column can be a
placeholder under its own name); a `--flow` or `--mask-span` may hold placeholders too (`--flow
'text:"{subject}"->last'`: each row's own subject). Every
problem of the table (a missing column, an image file that does not exist, an id repeated or not a
plain name, a placeholder the row has no value for) is listed at once, with its row and column, before
a model is loaded. `--where` keeps the rows for which a pandas query is true (`type == 'ChooseAttr'`),
`--sample N --seed S` draws N of them, `--limit N` keeps the first N.
"""

import re
import string
from pathlib import Path

from .errors import UsageError
from .fields import shown

ROLES = ("id", "image", "question", "answer")  # the fields --columns maps to the table's columns
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
SHOWN_PROBLEMS = 20


def parse_columns(spec: str | None) -> dict:
    """'id=qid,image=img' -> {'id': 'qid', 'image': 'img'}; UsageError for a malformed item."""
    mapping = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        field, _, column = item.partition("=")
        if not field.strip() or not column.strip():
            raise UsageError(f"bad --columns item '{shown(item)}': use FIELD=COLUMN, e.g. id=qid,image=img")
        mapping[field.strip()] = column.strip()
    return mapping


def read_table(path: Path):
    """The table of a CSV, JSON Lines or Parquet file, every value as the file has it."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable table is one line
        raise UsageError(f"--dataset {path}: not a readable {suffix[1:]} table ({type(exc).__name__}: "
                         f"{shown(exc)})") from None
    raise UsageError(f"--dataset {path}: use a .csv, .jsonl or .parquet file")


def select_rows(table, where: str | None, sample: int | None, seed: int, limit: int | None):
    """The rows --where keeps, then --sample of them (seeded), then the first --limit."""
    if where:
        try:
            table = table.query(where)
        except Exception as exc:  # noqa: BLE001 - a query that does not fit the table is one line
            raise UsageError(f"--where {shown(where)}: {type(exc).__name__}: {shown(exc)}") from None
    if sample is not None:
        if sample < 1:
            raise UsageError(f"--sample must be at least 1 (got {sample})")
        table = table.sample(n=min(sample, len(table)), random_state=seed)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be at least 1 (got {limit})")
        table = table.head(limit)
    if not len(table):
        raise UsageError("the dataset has no rows to run" + (f" (--where {shown(where)} keeps none)" if where else ""))
    return table


def example_values(table, path: Path, columns: dict, template: str | None, takes_images: bool,
                   answer_target: bool = False, per_row: dict | None = None) -> tuple:
    """([(row number, name, {prompt, image?, ...}) ...], [problem lines]) for the selected rows. per_row: options
    whose values hold {placeholders} ({"flows": [...]}), filled in from each row."""
    per_row = per_row or {}
    problems = []
    mapped = {**{"question": "question"}, **columns}
    for field, column in mapped.items():
        if column not in table.columns and (field != "question" or template is None):
            problems.append(f"--columns {field}={column}: the table has no column '{column}' "
                            f"(it has {', '.join(map(str, table.columns[:12]))})")
    if "image" in mapped and not takes_images:
        problems.append("--columns image=...: this tool has no images (use mask_impact_vl.py)")
    placeholders = [name for _, name, _, _ in string.Formatter().parse(template or "") if name]
    aliases = {field: column for field, column in mapped.items() if column in table.columns}
    for name in placeholders:
        if name not in table.columns and name not in aliases:
            problems.append(f"--prompt-template: no column '{name}' for the placeholder {{{name}}}")
    if problems:
        return [], problems
    examples, seen = [], {}
    for number, (_, row) in enumerate(table.iterrows(), start=1):
        where = f"row {number}"
        name = str(row[mapped["id"]]).strip() if "id" in mapped else f"row{number}"
        if not NAME.fullmatch(name):
            problems.append(f"{where}, column {mapped['id']}: '{shown(name)}' is not a plain name (letters, digits, "
                            "'.', '_', '-')")
        elif name in seen:
            problems.append(f"{where}, column {mapped['id']}: '{name}' is also the id of row {seen[name]}")
        seen.setdefault(name, number)
        values = {**{k: row[k] for k in table.columns}, **{f: row[c] for f, c in aliases.items()}}
        if template is None:
            prompt = str(values.get("question", "")).strip()
        else:
            prompt = template.format(**{k: "" if _missing(v) else v for k, v in values.items()}).strip()
            empty = [n for n in placeholders if _missing(values.get(n))]
            if empty:
                problems.append(f"{where}, column {aliases.get(empty[0], empty[0])}: empty, but the template uses it")
        if not prompt:
            problems.append(f"{where}, column {mapped['question']}: the prompt is empty")
        entry = {"prompt": prompt}
        if answer_target:
            if "answer" not in aliases or _missing(values.get("answer")):
                problems.append(f"{where}, column {mapped.get('answer', 'answer')}: no answer for --target answer")
            else:
                entry["target"] = f'text:"{values["answer"]}"'
        for key, specs in per_row.items():  # --flow 'text:"{subject}"->last': the row's own span
            try:
                entry[key] = [spec.format(**{k: "" if _missing(v) else v for k, v in values.items()})
                              for spec in specs]
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(f"{where}: {flag_of(key)} {specs[0]}: no column {exc} for its placeholder")
        if "image" in aliases:
            image = values["image"]
            if _missing(image):
                problems.append(f"{where}, column {mapped['image']}: no image")
            else:
                image_path = (path.parent / str(image)).resolve()
                if not image_path.is_file():
                    problems.append(f"{where}, column {mapped['image']}: image not found: {image_path}")
                entry["image"] = [str(image_path)]
        examples.append((number, name, entry))
    return examples, problems


def flag_of(key: str) -> str:
    return {"flows": "--flow", "mask_spans": "--mask-span"}[key]


def _checked_above(path, max_pixels=None) -> None:
    """The image check of the settings: example_values has said, with its row, where a file is missing."""


def _rows(rows: list, total: int) -> str:
    if len(rows) == total and total > 1:
        return "every row"
    return f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}"


def _missing(value) -> bool:
    import pandas as pd

    return value is None or (isinstance(value, float) and pd.isna(value)) or str(value).strip() == ""


def load_dataset(path, tool, overrides: dict, columns: str | None = None, template: str | None = None,
                 limit: int | None = None, sample: int | None = None, seed: int = 0, where: str | None = None):
    """The dataset as a BatchConfig (one prompt per example, named by its id); UsageError listing every
    problem of the table, before any model is loaded."""
    from .batch_config import BatchConfig, BatchPrompt
    from .options import collect_settings, tool_defaults, unused_options

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--dataset {path}: file not found")
    mapping = parse_columns(columns)
    unknown = [f for f in mapping if f not in ROLES and not template]
    if unknown:
        raise UsageError(f"--columns {unknown[0]}=...: unknown field (use {', '.join(ROLES)}, or name it in "
                         "a --prompt-template)")
    table = select_rows(read_table(path), where, sample, seed, limit)
    answer_target = overrides.get("target") == "answer"
    if answer_target and "answer" not in mapping:
        raise UsageError("--target answer needs the table's answer column: --columns answer=COLUMN")
    per_row = {key: list(overrides[key]) for key in ("flows", "mask_spans")
               if any("{" in str(spec) for spec in overrides.get(key) or ())}
    examples, problems = example_values(table, path, mapping, template, tool.takes_images, answer_target, per_row)
    prompts, rows_of = [], {}
    base = {**tool_defaults(tool), **overrides}
    for index, (number, name, entry) in enumerate(examples):
        settings, found = collect_settings({**base, **entry, "output": name}, Path.cwd(),
                                           image_check=_checked_above)
        for _, message in found:  # a problem of the options (the model, say) is said once, with its rows
            rows_of.setdefault(message, []).append(number)
        prompts.append(BatchPrompt(index=index, name=name, enabled=True, settings=settings))
    problems += [f"{_rows(rows, len(examples))}: {message}" for message, rows in rows_of.items()]
    if problems:
        more = len(problems) - SHOWN_PROBLEMS
        listing = "\n  ".join(problems[:SHOWN_PROBLEMS] + ([f"... and {more} more"] if more > 0 else []))
        raise UsageError(f"dataset {path}: {problems[0]}" if len(problems) == 1
                         else f"dataset {path} has {len(problems)} problems:\n  {listing}")
    output_dir = str(Path(base.get("output_dir") or "output").resolve())
    warnings = tuple(unused_options(prompts[0].settings, overrides)) if prompts else ()
    return BatchConfig(path=path.resolve(), tool=tool, prompts=prompts, output_dir=output_dir, warnings=warnings)
