"""Turn a safety preference set into ``pair_id, prompt, messages, chosen, rejected`` records.

    python -m workflow.prepare_preferences --source-json '{"path": "../shared/data/hh-rlhf/harmless-base/test.jsonl.gz"}' \
        --format hh-rlhf --n-train 192 --n-heldout 64 --seed 0 \
        --train results/data/preferences/train.jsonl --heldout results/data/preferences/heldout.jsonl \
        --summary results/data/preferences/summary.json

Formats: ``hh-rlhf`` (Anthropic/hh-rlhf: two full ``\\n\\nHuman: … \\n\\nAssistant: …`` transcripts
that share the dialogue and differ in the last assistant turn) and ``pku-saferlhf``
(PKU-Alignment/PKU-SafeRLHF-30K: chosen = the response named by ``safer_response_id``).
``messages`` is the dialogue before the final answer as chat turns; ``prompt`` is its last user turn.
"""
from __future__ import annotations

import argparse
import json
import random
import re

from workflow.lib.config import fill_defaults, schema_default
from workflow.lib.files import write_json, write_jsonl
from workflow.lib.sources import SourceError, load_rows, require_columns

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict]:
    """``\\n\\nHuman: a\\n\\nAssistant: b`` -> ``[{"role": "user", "content": "a"}, ...]``."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise ValueError("transcript does not start with a Human/Assistant turn")
    return [{"role": _ROLE[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Shared dialogue and the two final assistant answers of an HH-RLHF pair."""
    a, b = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
    if not a or not b or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
        raise ValueError("transcript does not end with an assistant turn")
    if a[:-1] != b[:-1]:
        raise ValueError("chosen and rejected transcripts do not share the dialogue")
    if not a[:-1] or a[-2]["role"] != "user":
        raise ValueError("no user turn before the final answer")
    return a[:-1], a[-1]["content"], b[-1]["content"]


def hh_records(rows: list[dict], what: str) -> tuple[list[dict], dict]:
    require_columns(rows, ["chosen", "rejected"], what)
    records, dropped = [], {}
    for i, row in enumerate(rows):
        try:
            messages, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
        except ValueError as e:
            dropped[str(e)] = dropped.get(str(e), 0) + 1
            continue
        records.append({"pair_id": f"hh-{i}", "messages": messages, "chosen": chosen, "rejected": rejected})
    return records, dropped


def pku_records(rows: list[dict], what: str) -> tuple[list[dict], dict]:
    require_columns(rows, ["prompt", "response_0", "response_1", "safer_response_id"], what)
    records = []
    for i, row in enumerate(rows):
        safer = int(row["safer_response_id"])
        if safer not in (0, 1):
            raise SourceError(f"{what}: row {i}: safer_response_id must be 0 or 1, got {row['safer_response_id']!r}")
        records.append({
            "pair_id": f"pku-{i}",
            "messages": [{"role": "user", "content": row["prompt"].strip()}],
            "chosen": row[f"response_{safer}"].strip(),
            "rejected": row[f"response_{1 - safer}"].strip(),
        })
    return records, {}


FORMATS = {"hh-rlhf": hh_records, "pku-saferlhf": pku_records}


def check_pairs(records: list[dict], dropped: dict, what: str) -> list[dict]:
    """Drop pairs with an empty answer (a known quirk of HH-RLHF, counted in the summary); refuse
    pairs whose two answers are identical, which carry no preference and point to a data bug."""
    kept = []
    for r in records:
        if not r["chosen"] or not r["rejected"]:
            dropped["empty answer"] = dropped.get("empty answer", 0) + 1
        elif r["chosen"] == r["rejected"]:
            row = r["pair_id"].rsplit("-", 1)[1]
            raise SourceError(f"{what}: row {row} (pair {r['pair_id']}): chosen is identical to rejected")
        else:
            kept.append({**r, "prompt": r["messages"][-1]["content"]})
    return kept


def split_train_heldout(records: list[dict], n_train: int, n_heldout: int, seed: int):
    """Seeded disjoint split; held-out pairs come first so growing ``n_train`` keeps them fixed."""
    if n_train + n_heldout > len(records):
        raise SourceError(
            f"preferences: n_train + n_heldout = {n_train + n_heldout} but only {len(records)} usable pairs"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    heldout = [records[i] for i in order[:n_heldout]]
    train = [records[i] for i in order[n_heldout:n_heldout + n_train]]
    return train, heldout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-json", required=True, help='data source: {"path": ...} or {"hub": ..., "split": ...}')
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--n-train", type=int, required=True)
    p.add_argument("--n-heldout", type=int, required=True)
    p.add_argument("--seed", type=int, default=schema_default("preferences/seed"))
    p.add_argument("--train", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--summary", required=True)
    a = p.parse_args(argv)

    source = fill_defaults(json.loads(a.source_json), "preferences/source")
    what = f"preferences.source ({source.get('path') or source.get('hub')})"
    rows = load_rows(source, what=what)
    records, dropped = FORMATS[a.format](rows, what)
    records = check_pairs(records, dropped, what)
    train, heldout = split_train_heldout(records, a.n_train, a.n_heldout, a.seed)
    write_jsonl(a.train, train)
    write_jsonl(a.heldout, heldout)
    summary = {"source": source, "format": a.format, "rows_read": len(rows), "usable_pairs": len(records),
               "dropped": dropped, "n_train": len(train), "n_heldout": len(heldout), "seed": a.seed}
    write_json(a.summary, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
