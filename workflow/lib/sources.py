"""Load tabular data sets from a local path or a Hugging Face hub id.

A source is a mapping from the config, either ``{"path": ...}`` (a ``.jsonl``, ``.jsonl.gz``,
``.json``, ``.csv``, ``.parquet`` or ``.txt`` file, or a folder of such files) or ``{"hub": id}`` with
optional ``config``, ``split`` and ``data_dir``. Offline runs use paths (the mirror in
``../shared/data``); online users give the canonical hub ids and get the same rows.

A ``.txt`` file is a plain list of prompts, one per line: each non-blank line is a row with one
column, ``text`` (so a benchmark reads it with ``prompt_column: text``); blank lines are skipped,
a UTF-8 byte-order mark is ignored.

Error rules, the same for every format: bytes that are not UTF-8 raise a ``SourceError`` naming the
file and the byte offset; an empty file (zero bytes, or only blank lines in a line-based format)
has no rows, and ``load_rows`` stops naming the config key and the file ("no rows in ...").
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet", ".txt")
TEXT_COLUMN = "text"  # the one column of a .txt file (and of a JSON list of strings)


class SourceError(ValueError):
    """A data source is missing or not in the expected shape."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _read_lines(path: Path) -> list[dict]:
    """One row ``{"text": line}`` per non-blank line of a plain text file."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the first prompt
    except UnicodeDecodeError as e:  # decoded whole, so the offset is the file's (and gives the line)
        line = data.count(b"\n", 0, e.start) + 1
        raise SourceError(f"{path}: not UTF-8 text (line {line}, byte {e.start}: {e.reason})") from None
    return [{TEXT_COLUMN: line.strip()} for line in text.splitlines() if line.strip()]


def _read_file(path: Path) -> list[dict]:
    suffix = _suffix(path)
    if suffix and path.stat().st_size == 0:  # no rows, like an empty .jsonl (json and pandas would raise their own errors)
        return []
    try:
        if suffix == ".txt":
            return _read_lines(path)
        if suffix in (".jsonl", ".jsonl.gz"):
            opener = gzip.open if suffix == ".jsonl.gz" else open
            rows = []
            with opener(path, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise SourceError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            return rows
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))
            if not isinstance(data, list):
                raise SourceError(f"{path}: expected a JSON list of records")
            return [r if isinstance(r, dict) else {TEXT_COLUMN: r} for r in data]
        import pandas as pd

        if suffix == ".csv":
            frame = pd.read_csv(path, keep_default_na=False, dtype=str, encoding="utf-8")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise SourceError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
        return frame.to_dict(orient="records")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def load_rows(source: dict, what: str = "source") -> list[dict]:
    """Rows of ``source`` as a list of dicts. ``what`` names the config key in error messages.

    A folder is read file by file (sorted); each row gets ``_file`` = the file's stem, which
    some sets use as a category (Do-Not-Answer ships one file per risk area).
    """
    if "path" in source:
        path = Path(source["path"]).expanduser()
        if not path.exists():
            raise SourceError(f"{what}: path {str(path)!r} does not exist (expected a data file or folder)")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if _suffix(p))
            if not files:
                raise SourceError(f"{what}: folder {str(path)!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
            rows = []
            for file in files:
                stem = file.name[: -len(_suffix(file))]
                rows.extend({**row, "_file": stem} for row in _read_file(file))
        else:
            rows = _read_file(path)
        if not rows:
            raise SourceError(f"{what}: no rows in {str(path)!r} (empty, or only blank lines)")
        return rows
    if "hub" in source:
        import datasets

        try:
            ds = datasets.load_dataset(
                source["hub"], source.get("config"), split=source.get("split", "train"),
                data_dir=source.get("data_dir"),
            )
        except Exception as e:  # the hub raises many types; all mean "could not load"
            raise SourceError(f"{what}: could not load hub data set {source['hub']!r}: {e}") from e
        return [dict(r) for r in ds]
    raise SourceError(f"{what}: expected a 'path' or a 'hub' key, got {sorted(source)}")


def require_columns(rows: list[dict], columns: list[str], what: str) -> None:
    """Fail with the first row missing any of ``columns``."""
    if not rows:
        raise SourceError(f"{what}: no rows")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise SourceError(
                f"{what}: row {i} has no column {missing[0]!r} (columns present: {sorted(row)})"
            )
