"""GGUF checkpoints: which file --model names, how transformers reads it, what the metadata says of it.

A GGUF file is read from its directory with `gguf_file=` (transformers de-quantizes it to the
requested dtype with the `gguf` package); a directory that holds one GGUF file and no config.json
names that file.
"""

import functools
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

SHOWN = 80  # characters of a path quoted in a message


def show(value) -> str:
    text = str(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def gguf_source(path: str) -> tuple | None:
    """(directory, file name) of a GGUF checkpoint: the file itself, or the one GGUF file of a directory that
    has no config.json; None for anything else. UsageError for a missing or damaged file, or several."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return None
        found = sorted(p.glob("*.gguf"))
        if not found:
            return None
        if len(found) > 1:
            raise UsageError(f"model directory {show(path)} holds {len(found)} GGUF files "
                             f"({', '.join(f.name for f in found[:4])}): give --model one of them")
        p = found[0]
    if not p.is_file():
        raise UsageError(f"GGUF file not found: {show(path)}")
    with open(p, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise UsageError(f"{show(str(p))} is not a GGUF file (it does not start with the GGUF magic bytes)")
    check_complete(p)
    return str(p.parent), p.name


def check_complete(path: Path) -> None:
    """UsageError for a GGUF file cut short (a download or copy that stopped): its header must parse and every
    tensor's data must lie inside the file."""
    size = path.stat().st_size
    try:
        end, _ = header(path)
    except Exception as exc:  # noqa: BLE001 - whatever the parser trips on, the file is damaged
        raise UsageError(f"{show(str(path))} is a damaged GGUF file ({size} bytes; {type(exc).__name__}: "
                         f"{show(' '.join(str(exc).split()))}): was it cut short?") from None
    if end > size:
        raise UsageError(f"{show(str(path))} is cut short: its tensors need {end} bytes, the file has {size}")


def header(path) -> tuple:
    """(where the last tensor's data ends, general.file_type's value or None) of a GGUF file."""
    stat = Path(path).stat()
    return _header(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _header(path: str, size: int, modified: int) -> tuple:
    """Read once per version of the file (its size and time are in the key): the reader parses every field, the
    whole vocabulary among them (seconds for 49k tokens), and a run asks more than once."""
    import gguf

    reader = gguf.GGUFReader(path)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    field_ = reader.fields.get("general.file_type")
    return end, (int(field_.parts[field_.data[0]][0]) if field_ is not None else None)


@contextmanager
def parsed_once():
    """While a GGUF checkpoint loads, transformers parses the file three times (for the config, the tokenizer and
    the weights: every field, the whole vocabulary among them, seconds each for 49k tokens) and builds the gguf
    package's tensor-name map once per module of the model (hundreds of times, the same map). Inside this block
    each version of a file is parsed once and each map built once; outside it nothing is kept. Reentrant."""
    try:
        import gguf
    except ImportError:  # no GGUF checkpoint can load either
        gguf = None
    if gguf is None or getattr(gguf.GGUFReader, "parsed_once", False):
        yield
        return
    make_reader, make_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def reader(path, *args, **kwargs):
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = make_reader(path, *args, **kwargs)
        return readers[key]

    reader.parsed_once = True
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(make_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, make_map


def checkpoint(model: str) -> tuple:
    """(what from_pretrained reads, extra keywords): a GGUF file is read from its directory with gguf_file=
    (transformers de-quantizes it to the requested dtype); anything else as it is."""
    found = gguf_source(os.path.expanduser(model)) if model.lower().endswith(".gguf") or os.path.isdir(
        os.path.expanduser(model)) else None
    return (found[0], {"gguf_file": found[1]}) if found else (model, {})


def gguf_description(source: str, files: dict) -> dict | None:
    """The GGUF file and its quantisation type (general.file_type, e.g. MOSTLY_Q4_1), for the metadata."""
    if not files:
        return None
    import gguf

    path = os.path.join(source, files["gguf_file"])
    _, value = header(path)
    kind = None
    if value is not None:
        try:
            kind = gguf.LlamaFileType(value).name
        except ValueError:
            kind = str(value)
    return {"file": os.path.abspath(path), "quantization": kind, "bytes": os.path.getsize(path)}
