"""Data provenance: the data sources a config reads, and the sha256 of every local file among them.

Kept free of heavy imports: rules/report.smk imports it at parse time to declare the files as inputs.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def data_sources(config, prefix: str = "") -> dict[str, dict]:
    """Every data source in the config (a mapping with a ``path`` or ``hub`` key), by its config key."""
    if not isinstance(config, dict):
        return {}
    if isinstance(config.get("path"), str) or isinstance(config.get("hub"), str):
        return {prefix: config}
    found = {}
    for key, value in config.items():
        found.update(data_sources(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def local_source_paths(config: dict) -> list[str]:
    """The local files and folders the config reads data from."""
    return sorted({os.path.expanduser(s["path"]) for s in data_sources(config).values() if "path" in s})


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_files(config: dict) -> list[dict]:
    """One row per source file: config key, source (path, or hub id with its config/split), file, sha256."""
    rows = []
    for key, src in sorted(data_sources(config).items()):
        if "hub" in src:
            extra = ", ".join(f"{k}={src[k]}" for k in ("config", "data_dir", "split", "revision") if k in src)
            rows.append({"config key": key, "source": f"hub:{src['hub']}" + (f" ({extra})" if extra else ""),
                         "file": "", "sha256": "(hub dataset: no local file)"})
            continue
        path = Path(os.path.expanduser(src["path"]))
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            rows.append({"config key": key, "source": src["path"],
                         "file": str(f.relative_to(path)) if path.is_dir() else f.name,
                         "sha256": sha256_file(f) if f.exists() else "(missing)"})
    return rows
