"""Overlap between evaluation prompts and the probe data, in both directions (shared by the data stages).

- ``workflow.probe_data`` removes from the probe data every text that equals a prompt of the held-out
  preference set or of a benchmark in ``probe.decontaminate_against`` (decided before the probe is built).
- ``workflow.sample_benchmark`` removes from a benchmark's evaluated prompts every prompt that the finished
  probe data used (``probe_overlap``), so a benchmark added after the probe was built is clean too, without
  rebuilding the probe, the subspace or the policies.

Two prompts are the same when their ``normalise``d forms are equal (case, accents, punctuation and
whitespace ignored). docs/benchmarks.md describes the design.
"""
from __future__ import annotations

import re
import unicodedata

from workflow.lib.sources import SourceError

UNSAFE, SAFE = 1, 0  # the labels of the probe data (results/probe/data.jsonl), read by probe_data and train_probe


def normalise(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form used to detect overlap."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def probe_keys(probe_rows: list[dict]) -> set[str]:
    """Normalised prompts and texts of the probe data (``results/probe/data.jsonl`` rows).

    A row's ``prompt`` is what its text was built from (a PKU-SafeRLHF prompt before its response); the
    text itself counts too, so a benchmark prompt equal to a whole probe text is also an overlap.
    """
    keys = set()
    for row in probe_rows:
        keys.add(normalise(row["text"]))
        if row.get("prompt"):
            keys.add(normalise(row["prompt"]))
    keys.discard("")
    return keys


def probe_overlap(prompts: list[dict], probe_rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, removed): benchmark records split by whether the probe data used their prompt.

    A jailbreak-wrapped record is also removed when its ``base_prompt`` (the prompt inside the template)
    was used: the wrapped text differs, the request does not.
    """
    keys = probe_keys(probe_rows)
    kept, removed = [], []
    for record in prompts:
        texts = [record["prompt"], record.get("base_prompt") or ""]
        (removed if any(normalise(t) in keys for t in texts if t) else kept).append(record)
    return kept, removed


def find_overlap(texts: list[str], excluded: dict[str, list[str]]) -> dict[str, set[str]]:
    """For each excluded set, the normalised texts of ``texts`` that it also contains."""
    norm = {normalise(t) for t in texts}
    return {name: norm & {normalise(p) for p in prompts} for name, prompts in excluded.items()}


def decontaminate(texts: list[str], excluded: dict[str, list[str]]) -> tuple[list[str], dict[str, int]]:
    """``texts`` minus every text that matches an excluded prompt, and the count removed per set.

    A text matching several sets is counted under each.
    """
    banned = {name: {normalise(p) for p in prompts} for name, prompts in excluded.items()}
    removed = {name: 0 for name in excluded}
    kept = []
    for t in texts:
        key = normalise(t)  # once per text, not once per set: 8 sets made it 1.3 of probe_data's 3.8 CPU s
        hits = [name for name, b in banned.items() if key in b]
        for name in hits:
            removed[name] += 1
        if not hits:
            kept.append(t)
    return kept, removed


def assert_disjoint(texts: list[str], excluded: dict[str, list[str]], what: str) -> None:
    """Fail loudly if any text still overlaps an evaluation set."""
    for name, hits in find_overlap(texts, excluded).items():
        if hits:
            raise SourceError(f"{what} overlaps benchmark {name!r} in {len(hits)} prompt(s), e.g. {sorted(hits)[0]!r}")
