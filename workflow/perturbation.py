"""Is the sharpness-aware perturbation effective? One row per method, from its training logs.

    python -m workflow.perturbation --train-logs results/policies/*/noise*/seed*.train_log.tsv \
        --presets-json '{"shapo": {...}, "dpo": {...}}' --inert-effective-fraction 1e-3 --inert-cosine-gap 1e-6 \
        --table results/tables/perturbation.csv --markdown results/tables/perturbation.md

Every sharpness-aware step logs its diagnostics (``workflow.lib.train_step.SHARPNESS_COLUMNS``): the move
‖δ‖, the fraction of moved weights whose value changed in the compute precision, ΔL = L(θ+δ) − L(θ),
and the cosine between the gradients at θ and at θ+δ. Pooled over the method's noise rates, seeds and
sharpness-aware steps, a method is **inert** when the median changed fraction is below
``inert_effective_fraction`` (the forward pass saw almost the same weights) or the median gradient
cosine is above 1 − ``inert_cosine_gap`` (the optimizer got almost the same gradient), config
``report``. Either means the optimizer sees, to within rounding, its base loss's gradient: it trains
as its base method (the same preset without ``sharpness``, named in the table when one is defined).
Either alone suffices: in fp32 a raw move of a few ulps changes most moved weights while leaving the
gradient's direction at 1 − 1e-9, and that step is no more effective than one that rounds away.
Each row carries one plain sentence (``statement``) that the report prints.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pandas as pd

from workflow.lib.config import fill_defaults, schema_default
from workflow.lib.display import markdown, perturbation_display
from workflow.lib.files import atomic_path, read_train_logs, write_text

NEEDED = ["step", "loss", "loss_perturbed", "sharpness_step", "move_norm", "move_relative", "effective_fraction",
          "grad_cosine", "grad_norm_change"]
COLUMNS = ["method", "subspace", "perturbation", "size", "interval", "base", "policies", "steps", "move_norm",
           "move_relative", "effective_fraction", "effective_fraction_max", "grad_cosine", "cosine_gap",
           "grad_norm_change", "delta_loss", "delta_loss_abs_max", "verdict", "statement"]


def read_logs(paths: list[str]) -> pd.DataFrame:
    """The sharpness-aware steps of every training log, tagged with method, noise and seed from the path."""
    logs = read_train_logs(paths, NEEDED, "; it was written before the sharpness diagnostics existed: rerun train_policy")
    return logs.assign(sharpness_step=logs.sharpness_step.astype(str).str.lower().eq("true"))


def base_method(name: str, presets: dict) -> str:
    """The preset that is ``name`` without its sharpness block (e.g. shapo -> dpo), or ''."""
    plain = {k: v for k, v in presets[name].items() if k != "sharpness"}
    return next((other for other, p in presets.items() if other != name and p == plain), "")


def is_inert(fraction: float, gap: float, max_fraction: float, max_gap: float) -> bool:
    """Inert: few moved weights changed in the compute precision, or the gradient kept its direction (1 − cos
    below ``max_gap``; a gap that was not measured, NaN, decides nothing)."""
    return fraction < max_fraction or (not math.isnan(gap) and gap < max_gap)


def _g(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3g}"


def statement(row: dict, max_fraction: float, max_gap: float) -> str:
    """One plain sentence on a method's perturbation, written from its row."""
    m, base = row["method"], row["base"]
    as_base = f"it trains as {base}" if base else "it trains as its loss without the sharpness step"
    if row["verdict"] == "no step":
        return (f"{m} took no sharpness-aware step (interval {row['interval']} exceeds the steps of each run), so "
                f"{as_base}.")
    where = f"over {row['steps']} sharpness-aware step(s) of {row['policies']} run(s)"
    move = (f"its move ‖δ‖ (median {_g(row['move_norm'])}, {_g(row['move_relative'])} of ‖W_S‖) changed a median "
            f"{_g(row['effective_fraction'])} of the moved weights in the compute precision")
    if math.isnan(row["grad_cosine"]):
        grad = "the gradient cosine was not logged (gradient_cosine: false)"
    else:
        grad = (f"the gradient at the moved point had a median cosine of 1 − {_g(row['cosine_gap'])} with the "
                f"plain gradient")
    loss = f"ΔL = L(θ+δ) − L(θ) had median {_g(row['delta_loss'])} (largest |ΔL| {_g(row['delta_loss_abs_max'])})"
    rule = f"fraction below {max_fraction:g} or cosine above 1 − {max_gap:g}"
    numbers = f"{where}, {move}, {grad}, and {loss}"
    if row["verdict"] == "inert":
        return (f"{m} is inert: {numbers}. By the rule ({rule}) its optimizer saw the plain gradient to within "
                f"rounding: {as_base}, and a difference from {base or 'that loss'} is not an effect of the geometry "
                "step.")
    return f"{m} is effective: {numbers}. Neither measure meets the rule for inert ({rule})."


def summarise(logs: pd.DataFrame, presets: dict, methods: list[str], max_fraction: float,
              max_gap: float) -> pd.DataFrame:
    """One row per method with a sharpness block: medians over its sharpness-aware steps (all noise rates and
    seeds pooled), the verdict and its sentence. ``presets`` as the config holds them (defaults filled)."""
    rows = []
    for method in methods:
        sharp = presets[method].get("sharpness")
        if not sharp:
            continue
        runs = logs[logs.method == method]
        steps = runs[runs.sharpness_step]
        size = (f"ρ = {sharp['rho']:g}" if sharp["perturbation"] == "normalized"
                else f"γ ~ U[{sharp['gamma_min']:g}, {sharp['gamma_max']:g}]")
        delta = steps.loss_perturbed - steps.loss
        row = {"method": method, "subspace": sharp["subspace"], "perturbation": sharp["perturbation"], "size": size,
               "interval": sharp["interval"], "base": base_method(method, presets),
               "policies": int(runs.path.nunique()) if len(runs) else 0, "steps": len(steps),
               "move_norm": steps.move_norm.median(), "move_relative": steps.move_relative.median(),
               "effective_fraction": steps.effective_fraction.median(),
               "effective_fraction_max": steps.effective_fraction.max(),
               "grad_cosine": steps.grad_cosine.median(), "cosine_gap": (1 - steps.grad_cosine).median(),
               "grad_norm_change": steps.grad_norm_change.median(), "delta_loss": delta.median(),
               "delta_loss_abs_max": delta.abs().max()}
        row = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}
        if not len(steps):
            row["verdict"] = "no step"
        else:
            inert = is_inert(row["effective_fraction"], row["cosine_gap"], max_fraction, max_gap)
            row["verdict"] = "inert" if inert else "effective"
        row["statement"] = statement(row, max_fraction, max_gap)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-logs", nargs="+", required=True, help="<method>/noise<ε>/seed<s>.train_log.tsv files")
    p.add_argument("--presets-json", required=True, help="the config's presets (every one: the base method is "
                                                         "looked up among them)")
    p.add_argument("--methods", nargs="+", help="methods to summarise (default: every method with a log)")
    p.add_argument("--inert-effective-fraction", type=float, default=schema_default("report/inert_effective_fraction"))
    p.add_argument("--inert-cosine-gap", type=float, default=schema_default("report/inert_cosine_gap"))
    p.add_argument("--table", required=True, help="perturbation.csv")
    p.add_argument("--markdown", required=True, help="perturbation.md")
    a = p.parse_args(argv)

    presets = {name: fill_defaults(preset, f"presets/{name}") for name, preset in json.loads(a.presets_json).items()}
    logs = read_logs(a.train_logs)
    methods = a.methods or list(dict.fromkeys(logs.method))
    unknown = sorted(set(methods) - set(presets))
    if unknown:
        raise SystemExit(f"--methods: {unknown} are not in --presets-json")
    table = summarise(logs, presets, methods, a.inert_effective_fraction, a.inert_cosine_gap)
    with atomic_path(a.table) as tmp:
        table.to_csv(tmp, index=False)
    text = markdown(perturbation_display(table)) + "\n" + "\n\n".join(table.statement) + "\n"
    write_text(a.markdown, text)
    print(text)


if __name__ == "__main__":
    main()
