"""Recover from Snakemake's stale locks after a run was killed with SIGKILL.

Snakemake locks the working directory while it runs and removes the lock when it stops, even
on SIGTERM or Ctrl-C; a SIGKILL (an OOM kill, a node reboot, ``kill -9``) leaves the lock behind
and the next run refuses to start until ``snakemake --unlock``. The workflow records which
process holds the lock (``record_owner``, from ``onstart``) and, when a later run finds locks
whose owner is a dead process on this same host, removes them (``clear_stale_locks``, at parse
time). Locks held by a live process, or by a process on another host, are never touched.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

OWNER_FILE = "shapo_lock_owner.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def record_owner(snakemake_dir: str | os.PathLike = ".snakemake") -> None:
    """Note that this process (on this host) holds the working directory's lock."""
    folder = Path(snakemake_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (OWNER_FILE + ".tmp")
    tmp.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    tmp.replace(folder / OWNER_FILE)


def clear_stale_locks(snakemake_dir: str | os.PathLike = ".snakemake") -> list[str]:
    """Remove lock files left by a dead owner on this host; returns the files removed."""
    folder = Path(snakemake_dir)
    locks = sorted((folder / "locks").glob("*.lock")) if (folder / "locks").is_dir() else []
    owner_file = folder / OWNER_FILE
    if not locks or not owner_file.exists():
        return []
    try:
        owner = json.loads(owner_file.read_text())
        host, pid = owner["host"], int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        return []
    if host != socket.gethostname() or _alive(pid):
        return []
    for lock in locks:
        lock.unlink(missing_ok=True)
    owner_file.unlink(missing_ok=True)
    return [str(lock) for lock in locks]
