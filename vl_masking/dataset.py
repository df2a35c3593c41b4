"""A dataset table -> a batch of prompts (one per example), run like a --config batch.

    mask_impact_vl.py --dataset gqa.csv --columns id=qid,image=img,question=q \
        --prompt-template "{question} Answer the question using a single word or phrase." --limit 100

The table is a CSV, a JSON Lines file or a Parquet file. `--columns` maps the tool's fields to the
table's columns: `id` (each example's name; default the row number), `image` (a path, relative to the
table's directory; the VL tool), `question` (the prompt's text, unless a template is given), `answer`
(with `--target answer`, the flow measure reads the probability of the answer's first token, the text
tokenized as it would follow the prompt: targets.target_token), and any other name a template uses (by
default every column can be a placeholder under its own name); a `--flow` or `--mask-span` may hold
placeholders too (`--flow 'text:"{subject}"->last'`: each row's own subject). Every
problem of the table (a missing column, an image file that does not exist, an id repeated or not a
plain name, a placeholder the row has no value for) is listed at once, with its row and column (row 1 is
the table's first data row, whatever --where and --sample keep), before a model is loaded.

The table's other columns are carried into every result row of their example, each with one type for the
whole study, read from every selected row (column_kinds): true/false values -> bool, whole numbers ->
int64, numbers -> float64, anything else (text, or a column mixing numbers and text) -> text; a missing
value (null, NaN) is a null in any of them, an empty string stays an empty string. Lists, dicts and
bytes are not carried. `--where` keeps the rows for which a pandas query is true (`type == 'ChooseAttr'`),
`--sample N --seed S` draws N of them, `--limit N` keeps the first N.
"""

import hashlib
import json
import re
import string
from pathlib import Path

from .errors import UsageError
from .fields import shown
from .options import collect_settings, flag, option_fields, tool_defaults, unused_options
from .where import apply_where

ROLES = ("id", "image", "video", "question", "answer")  # the fields --columns maps to the table's columns
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
SHOWN_PROBLEMS = 20
MAX_NAME = 200  # an id names files (a picture in _images/): a file name has at most 255 bytes


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

    if path.is_dir():
        return read_saved_dataset(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix in (".jsonl", ".ndjson"):
            return _read_json_lines(path)
        if suffix == ".parquet":  # whole numbers with a missing value stay whole numbers (Int64, not float)
            return pd.read_parquet(path, dtype_backend="numpy_nullable")
    except Exception as exc:  # noqa: BLE001 - any unreadable table is one line
        raise UsageError(f"--dataset {path}: not a readable {suffix[1:]} table ({type(exc).__name__}: "
                         f"{shown(exc)})") from None
    raise UsageError(f"--dataset {path}: use a .csv, .jsonl or .parquet file, or a datasets save_to_disk directory")


def _read_json_lines(path: Path):
    """JSON Lines as the file has them: 1 stays an int beside a null (pandas' reader makes the column float)."""
    import pandas as pd

    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
            if not isinstance(record, dict):
                raise ValueError(f"line {number}: not a JSON object")
            records.append(record)
    keys = list(dict.fromkeys(k for record in records for k in record))  # a key a line lacks: a missing value
    return pd.DataFrame({k: pd.Series([r.get(k) for r in records], dtype=object) for k in keys})


def read_saved_dataset(path: Path):
    """A directory written by datasets' save_to_disk (one split), through the datasets package."""
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
        raise UsageError(f"--dataset {path}: a dataset with splits ({', '.join(splits)}): give one split's "
                         f"directory, e.g. {path / (splits[0] if splits else 'validation')}")
    if not (path / "state.json").exists():
        raise UsageError(f"--dataset {path}: a directory, but not one written by datasets' save_to_disk "
                         "(no state.json)")
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--dataset {path}: reading a datasets directory needs the datasets package "
                         "(pip install datasets)") from None
    try:
        data = datasets.load_from_disk(str(path))
        for name, feature in data.features.items():  # pictures as their stored bytes, not decoded
            if isinstance(feature, datasets.Image):
                data = data.cast_column(name, datasets.Image(decode=False))
        return data.to_pandas()
    except Exception as exc:  # noqa: BLE001 - any unreadable directory is one line
        raise UsageError(f"--dataset {path}: not a readable datasets directory ({type(exc).__name__}: "
                         f"{shown(exc)})") from None


def select_rows(table, where: str | None, sample: int | None, seed: int, limit: int | None):
    """The rows --where keeps, then --sample of them (seeded), then the first --limit."""
    if where:
        table = apply_where(table, where)
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
    """([(row number, name, {prompt, image?, ...}, {column: value}) ...], [problem lines]) for the selected rows.
    per_row: options whose values hold {placeholders} ({"flows": [...]}), filled in from each row."""
    per_row = per_row or {}
    problems = []
    mapped = {**{"question": "question"}, **columns}
    for field, column in mapped.items():
        if column not in table.columns and (field != "question" or template is None):
            problems.append(f"--columns {field}={column}: the table has no column '{column}' "
                            f"(it has {', '.join(map(str, table.columns[:12]))})")
    for medium in ("image", "video"):
        if medium in mapped and not takes_images:
            problems.append(f"--columns {medium}=...: this tool has no {medium}s (use mask_impact_vl.py)")
    placeholders = template_fields(template or "", "--prompt-template")
    aliases = {field: column for field, column in mapped.items() if column in table.columns}
    for name in placeholders:
        if name not in table.columns and name not in aliases:
            problems.append(f"--prompt-template: no column '{name}' for the placeholder {{{name}}}")
    for key, specs in per_row.items():  # --flow 'text:"{subject}"->last': said once, not once per row
        for spec in specs if isinstance(specs, list) else [specs]:
            for name in template_fields(spec, flag(key)):
                if name not in table.columns and name not in aliases:
                    problems.append(f"{flag(key)} {spec}: no column '{name}' for its placeholder")
    if problems:
        return [], problems
    examples, seen = [], {}
    kinds = column_kinds(table)
    for position, row in table.iterrows():
        number = position + 1  # the table's row (read_table numbers them 0, 1, ... before any selection)
        where = f"row {number}"
        name = str(row[mapped["id"]]).strip() if "id" in mapped else f"row{number}"
        if not NAME.fullmatch(name):
            problems.append(f"{where}, column {mapped['id']}: '{shown(name)}' is not a plain name (letters, digits, "
                            "'.', '_', '-')")
        elif len(name) > MAX_NAME:
            problems.append(f"{where}, column {mapped['id']}: the id has {len(name)} characters; at most {MAX_NAME} "
                            "(it names the example's files)")
        elif name in seen:
            problems.append(f"{where}, column {mapped['id']}: '{name}' is also the id of row {seen[name]}")
        seen.setdefault(name, number)
        values = {**{k: row[k] for k in table.columns}, **{f: row[c] for f, c in aliases.items()}}
        if template is None:
            question = values.get("question")
            prompt = "" if _missing(question) else str(question).strip()
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
            filled = {k: "" if _missing(v) else v for k, v in values.items()}
            entry[key] = ([spec.format(**filled) for spec in specs] if isinstance(specs, list)
                          else specs.format(**filled))
        if "image" in aliases:
            image = values["image"]
            data = image_bytes(image)
            if data is not None:  # the datasets Image feature ({bytes, path}) or raw bytes
                kind = picture_format(data)
                if kind is None:
                    problems.append(f"{where}, column {mapped['image']}: the image bytes are not a picture Pillow "
                                    "reads")
                entry["image_bytes"] = (data, kind)
            elif _missing(image if not isinstance(image, dict) else image.get("path")):
                problems.append(f"{where}, column {mapped['image']}: no image")
            else:
                image = image.get("path") if isinstance(image, dict) else image
                image_path = ((path if path.is_dir() else path.parent) / str(image)).resolve()
                if not image_path.is_file():
                    problems.append(f"{where}, column {mapped['image']}: image not found: {image_path}")
                entry["image"] = [str(image_path)]
        if "video" in aliases:  # a video file or a folder of frames, relative to the table
            video = values["video"]
            if _missing(video):
                problems.append(f"{where}, column {mapped['video']}: no video")
            else:
                video_path = ((path if path.is_dir() else path.parent) / str(video)).resolve()
                if not video_path.exists():
                    problems.append(f"{where}, column {mapped['video']}: video not found: {video_path}")
                entry["video"] = [str(video_path)]
        carried = {k: (kind, _carried(row[k], kind)) for k, kind in kinds.items()}
        examples.append((number, name, entry, carried))
    return examples, problems


def template_fields(text: str, flag: str) -> list:
    """The column names a template's {placeholders} use; UsageError for anything but a plain {name}: a
    positional {} or {0}, an attribute or index ({name.attr}, {name[0]}), a conversion or a format
    specification, a brace left open."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise UsageError(f"{flag} {shown(text)}: {exc} (write a placeholder as {{column}}, a brace as {{{{ or }}}})") \
            from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.strip() or name.strip().isdigit() or any(c in name for c in ".[]"):
            raise UsageError(f"{flag} {shown(text)}: {{{name}}} is not a column's name (write {{column}}; "
                             "positions, attributes and indexes are not placeholders)")
        if spec or conversion:
            raise UsageError(f"{flag} {shown(text)}: {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}}: a placeholder takes no conversion or format "
                             "(write {column})")
        names.append(name)
    return names


def image_bytes(value) -> bytes | None:
    """The picture's bytes when the table holds them (the datasets Image feature stores {bytes, path})."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) and len(value) else None


def picture_format(data: bytes) -> str | None:
    """The file suffix of a picture's bytes ('.png'), or None when Pillow cannot read them."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            return "." + (picture.format or "png").lower().replace("jpeg", "jpg")
    except (UnidentifiedImageError, OSError, ValueError):
        return None


KINDS = ("bool", "int", "float", "str")  # a carried column's type: study_run.carried_column writes each


def column_kinds(table) -> dict:
    """{column: kind} for the columns carried into the result rows: one type per column for the whole study,
    read from every selected row (a chunk of examples with only nulls, or only whole numbers, must not get
    a type of its own). Columns holding lists, dicts or bytes are left out."""
    kinds = {}
    for column in table.columns:
        present = [_plain(v) for v in table[column] if not _null(v)]
        if any(not isinstance(v, (str, int, float, bool)) for v in present):
            continue
        if present and all(isinstance(v, bool) for v in present):
            kinds[column] = "bool"
        elif present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            kinds[column] = "int"
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            kinds[column] = "float"
        else:
            kinds[column] = "str"
    return kinds


def _carried(value, kind: str):
    """One table value as its column's kind; None for a missing value."""
    if _null(value):
        return None
    value = _plain(value)
    return {"bool": bool, "int": int, "float": float, "str": str}[kind](value)


def _null(value) -> bool:
    """A missing value: None, NaN, pandas' NA or NaT (an empty string is a value)."""
    import pandas as pd

    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # an array or list: a value, not a missing one
        return False


def _plain(value):
    """A table value as Python (numpy scalars unwrapped)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _checked_above(path, max_pixels=None) -> None:
    """The image check of the settings: example_values has said, with its row, where a file is missing."""


def _rows(rows: list, total: int) -> str:
    if len(rows) == total and total > 1:
        return "every row"
    return f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}"


def _missing(value) -> bool:
    return _null(value) or (isinstance(value, str) and value.strip() == "")


def load_dataset(path, tool, overrides: dict, columns: str | None = None, template: str | None = None,
                 limit: int | None = None, sample: int | None = None, seed: int = 0, where: str | None = None,
                 only_correct: bool = False):
    """The dataset as a study.Study (one example per selected row, named by its id); UsageError listing every
    problem of the table, before any model is loaded."""
    from .study import Example, Study, study_directories

    path = Path(path)
    if not path.exists():
        raise UsageError(f"--dataset {path}: file not found")
    mapping = parse_columns(columns)
    unknown = [f for f in mapping if f not in ROLES and not template]
    if unknown:
        raise UsageError(f"--columns {unknown[0]}=...: unknown field (use {', '.join(ROLES)}, or name it in "
                         "a --prompt-template)")
    table = select_rows(read_table(path).reset_index(drop=True), where, sample, seed, limit)
    overrides = dict(overrides)
    name = overrides.pop("output", None) or path.stem
    answer_target = overrides.get("target") == "answer"
    if answer_target and "answer" not in mapping:
        raise UsageError("--target answer needs the table's answer column: --columns answer=COLUMN")
    if only_correct and str(overrides.get("target", "predicted")).strip() == "predicted":
        raise UsageError("--only-correct keeps the examples the model answers right: it needs --target answer "
                         "(or text:\"...\"), the token the greedy first token is compared with")
    per_row = {}  # --flow 'text:"{subject}"->last', --target 'text:"{attribute}"': each row's own
    for f in (f for f in option_fields() if f.metadata["per_row"] and overrides.get(f.name)):
        specs = overrides[f.name]
        if f.metadata["kind"] == "repeat" and any("{" in str(spec) for spec in specs):
            per_row[f.name] = list(specs)
        elif f.metadata["kind"] != "repeat" and "{" in str(specs):
            per_row[f.name] = str(specs)
    if template is not None:
        template_fields(template, "--prompt-template")
    for key, specs in per_row.items():
        for spec in specs if isinstance(specs, list) else [specs]:
            template_fields(spec, flag(key))
    examples, problems = example_values(table, path, mapping, template, tool.takes_images, answer_target, per_row)
    rows_of, chosen, pictures = {}, [], []
    base = {**tool_defaults(tool), **overrides}
    output_dir = Path(base["output_dir"]).resolve()
    raw = base["measure"]
    measures = tuple(raw) if isinstance(raw, (list, tuple)) else tuple(m.strip() for m in str(raw).split(","))
    directories = study_directories(output_dir, name, measures)
    for index, (number, name_, entry, values) in enumerate(examples):
        if "image_bytes" in entry:  # written into the study's _images/ once the table has no problem
            data, kind = entry.pop("image_bytes")
            entry["image"] = [str(directories[measures[0]] / "_images" / f"{name_}{kind or '.png'}")]
            pictures.append((Path(entry["image"][0]), data))
        settings, found = collect_settings({**base, **entry, "output": name_}, Path.cwd(),
                                           image_check=_checked_above)
        for key, message in found:  # a problem of the options (the model, say) is said once, with its rows
            if key == "output" or (key == "prompt" and not entry["prompt"]):
                continue  # the id and the empty prompt: said above with the row's column
            rows_of.setdefault(message, []).append(number)
        chosen.append(Example(index=index, name=name_, row=number, settings=settings, values=values,
                              per_row=per_row))
    if not NAME.fullmatch(name):
        problems.append(f"--output {shown(name)}: the study's name must be a plain name (letters, digits, '.', "
                        "'_', '-')")
    problems += [f"{_rows(rows, len(examples))}: {message}" for message, rows in rows_of.items()]
    if problems:
        more = len(problems) - SHOWN_PROBLEMS
        listing = "\n  ".join(problems[:SHOWN_PROBLEMS] + ([f"... and {more} more"] if more > 0 else []))
        raise UsageError(f"dataset {path}: {problems[0]}" if len(problems) == 1
                         else f"dataset {path} has {len(problems)} problems:\n  {listing}")
    warnings = tuple(unused_options(chosen[0].settings, overrides))
    if "formats" in overrides:
        warnings += ("warning: --formats is not used with --dataset: a study writes Parquet parts into one "
                     "directory (pd.read_parquet reads it)",)
    description = {"table": str(path.resolve()), "table_sha256": _file_hash(path), "columns": mapping,
                   "prompt_template": template, "where": where, "sample": sample, "seed": seed, "limit": limit,
                   "only_correct": only_correct,
                   "overrides": {k: v for k, v in sorted(overrides.items()) if k not in ("output_dir", "memory_budget_mb",
                                                                                         "formats")}}
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()
    return Study(table=path.resolve(), tool=tool, directory=directories[measures[0]], examples=chosen,
                 measures=measures, description=description, only_correct=only_correct, warnings=warnings,
                 fingerprint=fingerprint, directories=directories, pictures=pictures)


def _file_hash(path: Path) -> str:
    """The table file's contents; for a datasets directory its files' names, sizes and state."""
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(path.rglob("*")):
            if item.is_file():
                digest.update(f"{item.relative_to(path)}:{item.stat().st_size}".encode())
        digest.update((path / "state.json").read_bytes())
        return digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



