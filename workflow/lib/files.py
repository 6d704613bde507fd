"""Atomic file writes and JSON-lines helpers shared by every stage.

Every output is written to a temporary file in the same folder and renamed into place, so
an interrupted job never leaves a partial file that a rerun could mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's data to disk (a read-only descriptor is enough on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk. Some file systems cannot
    fsync a folder (EINVAL); their renames are then as durable as they make them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file below ``path``, then every folder, deepest first (a folder after its entries)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(os.path.join(root, name))
        fsync_dir(root)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary name is fixed (``.<name>.tmp``), so one left by a killed job is overwritten
    by the rerun rather than accumulating; Snakemake never runs two jobs for one output. The data
    are flushed to disk before the rename and the folder after it: a node that crashes just after
    the job cannot leave an empty or partial file under the final name (the rename reaching the
    disk before the data is what a crash otherwise can leave).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder ``<path>.tmp``; on success it replaces ``path`` (a model, a checkpoint).

    A job killed while writing leaves only the ``.tmp`` folder, which the next attempt clears;
    ``path`` is either the previous complete folder or absent, never half-written. Every file and
    folder inside is flushed to disk before the rename, and the parent folder after it (as in
    ``atomic_path``).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    fsync_tree(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    fsync_dir(path.parent)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def strict_json(obj):
    """``obj`` with every non-finite float (NaN, ±inf) as None and numpy scalars and arrays as Python values, so that
    it serialises as standard JSON: Python's ``NaN``/``Infinity`` tokens are not JSON, and strict readers (a browser's
    ``JSON.parse``, serde_json, jq) reject the file. An undefined rate is written ``null``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":  # numpy scalar or array (np.float32 is no float)
        return strict_json(obj.tolist())
    return obj


def json_text(obj, **kwargs) -> str:
    """Standard JSON of ``obj`` (``strict_json``; ``allow_nan=False`` guarantees it)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def write_json(path, obj) -> None:
    """A JSON file (standard JSON: undefined numbers as null); other objects as ``str`` (paths)."""
    write_text(path, json_text(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_jsonl(path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json_text(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
    return rows


def write_tsv(path, frame) -> None:
    """Write a pandas DataFrame as a tab-separated file, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)


TRAIN_LOG_PATH = re.compile(r"(?P<method>[^/]+)/noise(?P<noise>[^/]+)/seed(?P<seed>[^/.]+)\.train_log\.tsv$")


def read_train_logs(paths: list[str], needed, stale: str = ""):
    """Every training log (a pandas frame), tagged with method, noise and seed from its path; a log without
    one of the ``needed`` columns is refused, naming the file and the columns (``stale``: why, what to do)."""
    import pandas as pd  # only the stages that read logs pay for pandas

    frames = []
    for path in paths:
        m = TRAIN_LOG_PATH.search(str(path))
        if not m:
            raise ValueError(f"{path}: not a training log path (expected <method>/noise<ε>/seed<s>.train_log.tsv)")
        log = pd.read_csv(path, sep="\t")
        missing = sorted(set(needed) - set(log.columns))
        if missing:
            raise ValueError(f"{path}: training log has no column(s) {missing}{stale}")
        frames.append(log.assign(method=m["method"], noise=float(m["noise"]), seed=int(m["seed"]), path=str(path)))
    return pd.concat(frames, ignore_index=True)
