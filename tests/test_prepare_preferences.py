import json

import pytest

from conftest import FIXTURES
from workflow import prepare_preferences
from workflow.lib.files import read_jsonl
from workflow.prepare_preferences import parse_hh_transcript, split_hh_pair, split_train_heldout
from workflow.lib.sources import SourceError, load_rows


def test_hh_multi_turn_pair_is_split_into_dialogue_and_two_answers():
    shared = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I'm locked out."
    messages, chosen, rejected = split_hh_pair(shared + "\n\nAssistant: Call a locksmith.",
                                               shared + "\n\nAssistant: Use a tension wrench.")
    assert messages == [{"role": "user", "content": "How do I pick a lock?"},
                        {"role": "assistant", "content": "Why?"},
                        {"role": "user", "content": "I'm locked out."}]
    assert (chosen, rejected) == ("Call a locksmith.", "Use a tension wrench.")


def test_hh_pairs_that_do_not_share_the_dialogue_are_refused():
    with pytest.raises(ValueError, match="share the dialogue"):
        split_hh_pair("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: d")
    with pytest.raises(ValueError, match="start with"):
        parse_hh_transcript("no turns here")


def run(tmp_path, source, fmt, n_train, n_heldout):
    out = {k: tmp_path / f"{k}.json{'l' if k != 'summary' else ''}" for k in ("train", "heldout", "summary")}
    prepare_preferences.main(["--source-json", json.dumps(source), "--format", fmt, "--n-train", str(n_train),
                              "--n-heldout", str(n_heldout), "--train", str(out["train"]),
                              "--heldout", str(out["heldout"]), "--summary", str(out["summary"])])
    return read_jsonl(out["train"]), read_jsonl(out["heldout"]), json.loads(out["summary"].read_text())


def test_hh_fixture_end_to_end(tmp_path):
    train, heldout, summary = run(tmp_path, {"path": str(FIXTURES / "hh_pairs.jsonl.gz")}, "hh-rlhf", 12, 4)
    assert len(train) == 12 and len(heldout) == 4
    assert not {r["pair_id"] for r in train} & {r["pair_id"] for r in heldout}
    assert summary["dropped"] == {"empty answer": 1}
    for r in train:
        assert r["prompt"] == r["messages"][-1]["content"] and r["messages"][-1]["role"] == "user"
        assert r["chosen"].startswith("I'm sorry") and r["rejected"].startswith("Sure")


def test_pku_saferlhf_chosen_is_the_safer_response(tmp_path):
    train, _, _ = run(tmp_path, {"path": str(FIXTURES / "pku_saferlhf.jsonl")}, "pku-saferlhf", 5, 1)
    raw = {f"pku-{i}": r for i, r in enumerate(read_jsonl(FIXTURES / "pku_saferlhf.jsonl"))}
    for r in train:
        src = raw[r["pair_id"]]
        assert r["chosen"] == src[f"response_{src['safer_response_id']}"]
        assert r["messages"] == [{"role": "user", "content": src["prompt"]}]


def test_split_is_seeded_and_heldout_is_stable_when_train_grows():
    records = [{"pair_id": str(i)} for i in range(20)]
    a_train, a_held = split_train_heldout(records, 5, 4, seed=1)
    b_train, b_held = split_train_heldout(records, 10, 4, seed=1)
    assert a_held == b_held and a_train == b_train[:5]
    with pytest.raises(SourceError, match="only 20 usable pairs"):
        split_train_heldout(records, 20, 4, seed=1)


def test_missing_path_and_missing_column_are_named(tmp_path):
    with pytest.raises(SourceError, match=r"preferences.source: path '.*nope.jsonl' does not exist"):
        load_rows({"path": str(tmp_path / "nope.jsonl")}, what="preferences.source")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) + "\n"
                   + json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b"}) + "\n")
    with pytest.raises(SourceError, match="row 1 has no column 'rejected'"):
        run(tmp_path, {"path": str(bad)}, "hh-rlhf", 1, 0)


def test_non_utf8_file_is_reported(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("prompt\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(SourceError, match="latin1.csv: not UTF-8"):
        load_rows({"path": str(bad)})
