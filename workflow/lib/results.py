"""The judged answers and the held-out preference scores, read into frames for the statistics.

Every judgement file ``results/judgements/{judge}/{model}/{benchmark}.jsonl`` is read with its summary
(``.json``, which carries method, noise, seed, kind, judge type): the summary's tags say which model and
benchmark a label file belongs to, for every reader (``workflow.stats``, ``workflow.judge_agreement``).
The metric of a benchmark is its harmful rate (``kind: harmful``) or its refusal rate (``kind: harmless``,
the over-refusal sets), both over ALL answers: the harmful rate is the official attack-success rate,
unsafe / all answers, an unparseable verdict counting as not unsafe (ShaPO md_asr.py:138,
nvidia_asr.py:236; HarmBench's mean of label == 1). ``harmful_rate_parseable`` (unsafe / parseable
answers) is kept beside it. ``answer_outcomes`` is the one place these per-answer outcomes are computed;
``rates`` (a judge's summary) and ``load_judgements`` (the tables) both use it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from workflow.lib.files import read_json, read_jsonl

LABELS = ("safe", "unsafe", "unparseable")


def answer_outcomes(rows: list[dict]) -> dict[str, list[float]]:
    """Per labelled answer: ``unsafe`` 1.0/0.0 (an unparseable verdict is 0.0: the official rate over all
    answers), ``unsafe_parseable`` the same but NaN when unparseable, ``refused`` 1.0/0.0."""
    return {"unsafe": [float(r["label"] == "unsafe") for r in rows],
            "unsafe_parseable": [math.nan if r["label"] == "unparseable" else float(r["label"] == "unsafe")
                                 for r in rows],
            "refused": [float(bool(r["refused"])) for r in rows]}


def rates(rows: list[dict]) -> dict:
    """Counts and rates of labelled answers, all over ALL answers unless named otherwise:
    ``harmful_rate`` = unsafe / n (the official attack-success rate: an unparseable verdict is not unsafe),
    ``harmful_rate_parseable`` = unsafe / (n - unparseable), ``refusal_rate`` = refused / n."""
    n = len(rows)
    outcome = answer_outcomes(rows)
    unsafe, refused = int(sum(outcome["unsafe"])), int(sum(outcome["refused"]))
    parseable = [x for x in outcome["unsafe_parseable"] if not math.isnan(x)]
    return {"n": n, "unsafe": unsafe, "refused": refused, "unparseable": n - len(parseable),
            "empty": sum(bool(r.get("empty")) for r in rows),
            # answers to prompts cut to fit the model's context (workflow.generate; absent in older files)
            "prompt_truncated": sum(bool(r.get("prompt_truncated")) for r in rows),
            "harmful_rate": unsafe / n if n else math.nan,
            "harmful_rate_parseable": sum(parseable) / len(parseable) if parseable else math.nan,
            "refusal_rate": refused / n if n else math.nan}


METRIC_OF_KIND = {"harmful": "harmful_rate", "harmless": "refusal_rate"}

RULE_BASED = "refusal_markers"  # the judge type that sees refusal phrases only

def metric_label(kind: str, judge_type: str | None) -> str:
    """What a benchmark's rate measures, for every table and figure that shows it."""
    if kind == "harmless":
        return "over-refusal rate (refusal markers)"  # ``refused`` is always the refusal-marker verdict
    if judge_type == RULE_BASED:
        return "no-refusal rate (refusal markers: refusal, not harm)"
    return "attack success rate (unsafe / all answers)"

PARSEABLE_LABEL = "unsafe / parseable answers"

def tagged_frame(frames: list[pd.DataFrame], what: str) -> pd.DataFrame:
    """Per-file frames as one, tagged with method, noise and seed (the base model: no noise, no seed)."""
    if not frames:
        raise ValueError(f"no {what} files given")
    data = pd.concat(frames, ignore_index=True)
    data["noise"] = pd.to_numeric(data["noise"], errors="coerce")
    data["seed"] = pd.to_numeric(data["seed"], errors="coerce").astype("Int64")
    return data

def load_judgements(paths: list[str]) -> pd.DataFrame:
    """One row per judged answer: judge, judge_type, method, noise, seed, benchmark, kind, id, category,
    unsafe, unsafe_parseable, refused.

    ``unsafe`` is 1.0/0.0 with an unparseable verdict as 0.0 (the official rate's numerator over all answers);
    ``unsafe_parseable`` is the same but NaN when unparseable (unsafe / parseable answers); ``outcome`` is the
    benchmark's metric per answer (unsafe for harmful kinds, refused for harmless ones). ``judge_type`` comes
    from the summary (summaries written before it was recorded: refusal_markers for the judge of that name).
    """
    frames = []
    for path in paths:
        summary = read_json(str(Path(path).with_suffix(".json")))
        rows = read_jsonl(path)
        if not rows:
            raise ValueError(f"{path}: no judged answers")
        for i, r in enumerate(rows):
            missing = {"id", "label", "refused"} - set(r)
            if missing:
                raise ValueError(f"{path}: row {i} has no {sorted(missing)} (expected id, label, refused)")
            if r["label"] not in LABELS:
                raise ValueError(f"{path}: row {i}: label {r['label']!r}, expected safe | unsafe | unparseable")
        kind = summary.get("kind", "harmful")
        if kind not in METRIC_OF_KIND:
            raise ValueError(f"{path}: kind {kind!r}, expected one of {sorted(METRIC_OF_KIND)}")
        frame = pd.DataFrame({
            "id": [r["id"] for r in rows],
            # sampled answers of one prompt share its id (evaluation.samples); files without samples: 0
            "sample": [r.get("sample", 0) for r in rows],
            "prompt_truncated": [bool(r.get("prompt_truncated", False)) for r in rows],
            "category": [r.get("category") or "all" for r in rows],
            "label": [r["label"] for r in rows],
            **answer_outcomes(rows),
        })
        frame["outcome"] = frame["unsafe"] if kind == "harmful" else frame["refused"]
        judge = summary.get("judge", Path(path).parts[-3])
        judge_type = summary.get("judge_type", RULE_BASED if judge == RULE_BASED else None)
        frames.append(frame.assign(judge=judge, judge_type=judge_type, method=summary["method"],
                                   noise=summary["noise"], seed=summary["seed"], benchmark=summary["benchmark"],
                                   kind=kind, metric=METRIC_OF_KIND[kind], metric_label=metric_label(kind, judge_type)))
    return tagged_frame(frames, "judgement")

def per_prompt(data: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt of a cell and seed: the sampled answers of a prompt (evaluation.samples) are
    repeated draws of ONE prompt, so its outcome is their mean (``unsafe_parseable``: the mean over its
    parseable answers, NaN when none was), and every bootstrap resamples prompts, not answers. ``samples``
    counts the answers averaged, ``prompt_truncated`` whether the prompt was cut to fit the context.
    Idempotent; with one answer per prompt the outcomes are unchanged."""
    if "samples" in data and "sample" not in data:
        return data  # already one row per prompt
    keys = ["judge", "judge_type", "method", "noise", "seed", "benchmark", "kind", "metric", "metric_label", "id",
            "category"]
    if "prompt_truncated" not in data:
        data = data.assign(prompt_truncated=False)
    return (data.groupby(keys, dropna=False, sort=False)
            .agg(unsafe=("unsafe", "mean"), unsafe_parseable=("unsafe_parseable", "mean"),
                 refused=("refused", "mean"), outcome=("outcome", "mean"), samples=("outcome", "size"),
                 prompt_truncated=("prompt_truncated", "max"))
            .reset_index())

def outcome_matrix(cell: pd.DataFrame, column: str = "outcome", ids=None) -> np.ndarray:
    """seeds x prompts array of one cell (rows of one judge/method/noise/benchmark), prompts in ``ids`` order."""
    wide = cell.pivot_table(index="seed", columns="id", values=column, aggfunc="first", dropna=False)
    return wide.reindex(columns=ids if ids is not None else sorted(wide.columns)).to_numpy(dtype=float)

def load_preference_scores(paths: list[str]) -> pd.DataFrame:
    """One row per model and held-out pair: method, noise, seed, id (pair id), margin, correct."""
    frames = []
    for path in paths:
        rows = read_jsonl(path)
        if not rows:
            raise ValueError(f"{path}: no scored pairs")
        for i, r in enumerate(rows):
            missing = {"pair_id", "method", "margin", "correct"} - set(r)
            if missing:
                raise ValueError(f"{path}: row {i} has no {sorted(missing)} (expected workflow.score_preferences rows)")
            if not math.isfinite(r["margin"]):
                raise ValueError(f"{path}: row {i} (pair {r['pair_id']!r}): margin {r['margin']} is not finite")
        frames.append(pd.DataFrame({"method": [r["method"] for r in rows], "noise": [r.get("noise") for r in rows],
                                    "seed": [r.get("seed") for r in rows], "id": [r["pair_id"] for r in rows],
                                    "margin": [float(r["margin"]) for r in rows],
                                    "correct": [float(r["correct"]) for r in rows]}))
    return tagged_frame(frames, "preference score")
