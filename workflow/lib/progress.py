"""Progress of long loops (training steps, scoring, probe and reward passes, generation and judging
batches), written to a job's log with a rate and an ETA.

Snakemake sends a job's stderr to its log file. tqdm redraws one line with carriage returns, which a
log file shows as one ever-growing line; ``progress`` writes each update as a line of its own instead,
at most every ``SHAPO_PROGRESS_SECONDS`` seconds (default 30) plus the first and the last, so that
``tail -f`` on the log reads well and an hour-long job writes a few hundred lines, not thousands.
On a terminal it is ordinary tqdm.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class _Lines:
    """A file-like wrapper that turns tqdm's carriage-return redraws into one line per update."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
             unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar for a job log: a line per update (rate, ETA), rate-limited; a bar on a terminal."""
    stream = sys.stderr
    interactive = stream.isatty()
    seconds = float(os.environ.get("SHAPO_PROGRESS_SECONDS", "30"))
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream if interactive else _Lines(stream),
                mininterval=0.5 if interactive else seconds, maxinterval=max(seconds, 1.0),
                ascii=not interactive, dynamic_ncols=interactive, ncols=None if interactive else 100,
                disable=os.environ.get("SHAPO_PROGRESS", "1") == "0", **kwargs)
