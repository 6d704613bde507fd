"""workflow.lib.files: JSON and JSON-lines files are standard JSON (an undefined number is null, never NaN)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from workflow.judge import summarise
from workflow.lib.files import read_json, read_jsonl, write_json, write_jsonl


def strict_load(text: str):
    """A reader as strict as JSON.parse or serde_json: Python's NaN/Infinity tokens are errors."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    obj = {"nan": math.nan, "inf": -math.inf, "np32": np.float32("nan"), "np64": np.float64(0.25),
           "nested": [{"x": float("inf")}, (1.5, np.nan)], "array": np.array([0.5, np.nan]), "ok": 1.0, "n": 3}
    write_json(tmp_path / "a.json", obj)
    assert strict_load((tmp_path / "a.json").read_text()) == {
        "nan": None, "inf": None, "np32": None, "np64": 0.25, "nested": [{"x": None}, [1.5, None]],
        "array": [0.5, None], "ok": 1.0, "n": 3}
    write_jsonl(tmp_path / "a.jsonl", [{"score": math.nan, "f32": np.float32(0.5)}, {"score": 1.0}])
    assert [strict_load(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()] == [
        {"score": None, "f32": 0.5}, {"score": 1.0}]
    assert read_jsonl(tmp_path / "a.jsonl")[0]["score"] is None


def test_a_judge_summary_with_nothing_parseable_is_standard_json(tmp_path):
    """An LLM judge whose every verdict was unparseable: harmful_rate_parseable is undefined and written null
    (it was written NaN, which strict readers reject)."""
    rows = [{"id": f"b-{i}", "label": "unparseable", "refused": False, "empty": False, "category": "c"}
            for i in range(3)]
    summary = summarise(rows, {"benchmark": "b", "kind": "harmful"}, "judge", "md_judge_v0_2")
    assert math.isnan(summary["harmful_rate_parseable"])
    write_json(tmp_path / "summary.json", summary)
    written = strict_load((tmp_path / "summary.json").read_text())
    assert written["harmful_rate_parseable"] is None and written["categories"]["c"]["harmful_rate_parseable"] is None
    assert written["harmful_rate"] == 0.0 and written["unparseable"] == 3
    assert read_json(tmp_path / "summary.json") == written


def test_objects_json_cannot_hold_are_still_refused_in_json_lines(tmp_path):
    with pytest.raises(TypeError):
        write_jsonl(tmp_path / "b.jsonl", [{"x": object()}])
