"""Finding and reading documents: the `data.source` of a DataConfig -> files -> documents (str), in a fixed order.

A source is 'stdlib' (this Python's standard library `.py` files, one document each, present on any
machine) or comma-separated paths, directories and globs of .txt/.gz/.xz (plain text), .jsonl (+.gz/.xz)
and .parquet files. Plain text is one document a file, or is split at lines equal to `separator`.
JSON lines and parquet give one document a record, read from `text_field`. `max_bytes` keeps whole
documents, in order, until their UTF-8 size reaches it.
"""

from __future__ import annotations

import glob
import gzip
import json
import lzma
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from sweeps.trial import DataConfig

STDLIB = "stdlib"
KINDS = ".txt/.gz/.xz/.jsonl/.parquet"
_OPENERS = {".gz": gzip.open, ".xz": lzma.open}


class DataError(Exception):
    """Bad data input (no files, a missing text field, a bad tokenizer...): a one-line message naming the field.

    Defined here, at the bottom layer, and exported by runners.data.store, where callers import it from."""


def stdlib_files() -> list[Path]:
    """This interpreter's standard library `.py` files (site-packages excluded), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def kind_of(path: Path) -> str:
    """'text', 'jsonl' or 'parquet' from the file name; '' when it is none of the supported kinds."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes.pop()
        if suffixes and suffixes[-1] == ".jsonl":
            return "jsonl"
        return "text"
    last = suffixes[-1] if suffixes else ""
    return {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}.get(last, "")


def source_files(source: str) -> list[Path]:
    """The files a source names, in order: parts as given, each part's files sorted, repeats dropped."""
    if source.strip() == STDLIB:
        return stdlib_files()
    found: dict[Path, None] = {}
    for part in (p.strip() for p in source.split(",")):
        for path in _part_files(part):
            found.setdefault(path)
    return list(found)


def _part_files(part: str) -> list[Path]:
    pattern = os.path.expanduser(part)
    if glob.has_magic(pattern):
        matched = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
        files = sorted(p for p in matched if kind_of(p))
    elif Path(pattern).is_dir():
        files = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and kind_of(p))
    elif Path(pattern).is_file():
        if not kind_of(Path(pattern)):
            raise DataError(f"data.source: '{part}' is not a {KINDS} file; give files of those kinds")
        files = [Path(pattern)]
    else:
        files = []
    if not files:
        raise DataError(f"data.source: no files match '{part}'; give a path or glob of {KINDS} files, or 'stdlib'")
    return files


def read_documents(cfg: DataConfig) -> Iterator[str]:
    """Every non-empty document of the source in order, stopping once `max_bytes` of UTF-8 text were given."""
    total = 0
    for doc in _all_documents(cfg):
        if not doc:
            continue
        yield doc
        total += len(doc.encode("utf-8"))
        if cfg.max_bytes is not None and total >= cfg.max_bytes:
            return


def _all_documents(cfg: DataConfig) -> Iterator[str]:
    if cfg.source.strip() == STDLIB:
        # A few stdlib test files are deliberately not UTF-8; replacement keeps them as (almost) the same text.
        for path in stdlib_files():
            yield path.read_bytes().decode("utf-8", errors="replace")
        return
    for path in source_files(cfg.source):
        kind = kind_of(path)
        if kind == "parquet":
            yield from _parquet_documents(path, cfg.text_field)
        else:
            with _open_text(path) as f:
                if kind == "jsonl":
                    yield from _jsonl_documents(f, path, cfg.text_field)
                elif cfg.separator is None:
                    yield f.read()
                else:
                    yield from split_at_separator(f, cfg.separator)


def _open_text(path: Path) -> IO[str]:
    opener = _OPENERS.get(path.suffix.lower(), open)
    return opener(path, "rt", encoding="utf-8", errors="replace", newline="")


def split_at_separator(lines: Iterable[str], separator: str) -> Iterator[str]:
    """Documents between lines equal to `separator`; the newline before a separator line ends the document."""
    doc: list[str] = []
    for line in lines:
        if line.rstrip("\r\n") == separator:
            yield _without_final_newline("".join(doc))
            doc = []
        else:
            doc.append(line)
    yield _without_final_newline("".join(doc))


def _without_final_newline(text: str) -> str:
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _jsonl_documents(lines: Iterable[str], path: Path, field: str) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data.source: {path}:{number} is not valid JSON ({e.msg}); fix the line") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"data.text_field: {path}:{number} has no string field '{field}'; "
                            "set text_field to the key holding the text")
        yield record[field]


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise DataError(f"data.text_field: {path} has no column '{field}' (it has {table.schema_arrow.names}); "
                          "set text_field to the text column")
    for batch in table.iter_batches(columns=[field]):
        yield from (text or "" for text in batch.column(0).to_pylist())
