"""The report's figures, each as PNG and PDF.

    python -m workflow.figures --rates results/tables/harmful_rate.csv \
        --train-logs results/policies/*/noise*/seed*.train_log.tsv --subspace results/subspace/summary.tsv \
        --figures results/figures [--scatter]

- ``harmful_rate_vs_noise``: the metric of each benchmark (harmful rate; refusal rate for over-refusal
  sets) against the noise rate, a line per method, bootstrap-CI error bars, the base model as a reference line;
- ``training_curves``: loss and pair accuracy on clean vs flipped pairs per step, a row per noise rate,
  a colour per method, mean over seeds;
- ``subspace_neurons``: the probe-selected neurons per layer;
- ``refusal_vs_harmful`` (with ``--scatter``; needs an evaluated harmless benchmark): over-refusal
  against harmful rate, a point per method and noise rate;
- ``preference_accuracy_vs_noise`` (with ``--preferences``): held-out preference accuracy and mean margin
  against the noise rate, a line per method, bootstrap-CI error bars, the base model as a reference line.
- ``perturbation_effect`` (with ``--perturbation``): per method with sharpness-aware steps, the distribution
  over those steps of ΔL = L(θ+δ) − L(θ), of the fraction of moved weights changed in the compute
  precision, and of 1 − cos(∇L(θ), ∇L(θ+δ)), with the report's inert thresholds.

Every ``plot_*`` function returns its figure (tests read its text and limits after a draw); ``save`` writes it with
its caption (``workflow.lib.captions``, at ``--ci-level``) in the PNG's and PDF's metadata. Figures use matplotlib's
constrained layout, which makes room for the suptitle, titles, tick labels and axis labels of every panel.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from workflow.lib.captions import figure_captions  # noqa: E402
from workflow.lib.config import schema_default  # noqa: E402
from workflow.lib.captions import level_text  # noqa: E402
from workflow.lib.files import atomic_path, read_train_logs  # noqa: E402

MARKERS = "osD^v<>"
DASHES = ["-", "--", "-.", ":"]


THRESHOLD = "threshold"  # gid of a threshold line that a caption names (tests check it lies inside its axis)


def save(fig, stem: Path, caption: str = "") -> None:
    """Write ``stem``.png and ``stem``.pdf atomically, the caption in each file's metadata."""
    metadata = {"png": {"Title": stem.name, "Description": caption}, "pdf": {"Title": stem.name, "Subject": caption}}
    for ext in ("png", "pdf"):
        with atomic_path(stem.with_suffix(f".{ext}")) as tmp:
            fig.savefig(tmp, format=ext, dpi=120, metadata=metadata[ext])
    plt.close(fig)


def outside_legend(fig, ax) -> None:
    """The legend of ``ax``'s lines beside the panels (inside one it would hide the lines of some method)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)


def metric_label(rows: pd.DataFrame) -> str:
    """What the rates measure (workflow.stats ``metric_label``: e.g. the refusal markers' no-refusal rate
    measures refusal, not harm)."""
    return str(rows.metric_label.iloc[0])


def plot_rates_vs_noise(rates: pd.DataFrame, level: float):
    benchmarks = sorted(rates.benchmark.unique())
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4.5 * len(benchmarks), 3.8), squeeze=False, sharey=True,
                             layout="constrained")
    methods = sorted(rates.loc[rates.method != "base", "method"].unique())
    noises = rates.noise.dropna()
    # methods with equal rates would hide each other: offset each a little along x, own marker and dash
    step = 0.012 * ((noises.max() - noises.min()) or 1.0) if len(noises) else 0.0
    for ax, bench in zip(axes[0], benchmarks):
        sub = rates[rates.benchmark == bench]
        for i, method in enumerate(methods):
            rows = sub[sub.method == method].sort_values("noise")
            yerr = np.vstack([(rows.rate - rows.ci_low).clip(lower=0), (rows.ci_high - rows.rate).clip(lower=0)])
            ax.errorbar(rows.noise + (i - (len(methods) - 1) / 2) * step, rows.rate, yerr=np.nan_to_num(yerr),
                        marker=MARKERS[i % 7], linestyle=DASHES[i % 4], capsize=3, label=method)
        base = sub[sub.method == "base"]
        if len(base):
            ax.axhline(base.rate.iloc[0], color="grey", linestyle="--", label="base (untrained)")
        ax.set_title(f"{bench} ({sub.kind.iloc[0]})")
        ax.set_xlabel("noise rate ε")
        ax.set_ylabel(metric_label(sub), fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    outside_legend(fig, axes[0][0])
    fig.suptitle(f"error bars: {level_text(level)} bootstrap CI over prompts and seeds", fontsize=9)
    return fig


def plot_preferences_vs_noise(prefs: pd.DataFrame, level: float):
    """Held-out preference accuracy (left) and mean implicit reward margin (right) against the noise rate, a line
    per method with bootstrap-CI error bars; the base model (or chance, 0.5 / 0) as a grey reference line."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), squeeze=False, layout="constrained")
    methods = sorted(prefs.loc[prefs.method != "base", "method"].unique())
    noises = prefs.noise.dropna()
    step = 0.012 * ((noises.max() - noises.min()) or 1.0) if len(noises) else 0.0
    base = prefs[prefs.method == "base"]
    for ax, metric, label, chance in zip(axes[0], ("accuracy", "mean_margin"),
                                         ("held-out preference accuracy (margin > 0)", "held-out mean margin"),
                                         (0.5, 0.0)):
        for i, method in enumerate(methods):
            rows = prefs[prefs.method == method].sort_values("noise")
            yerr = np.vstack([(rows[metric] - rows[f"{metric}_ci_low"]).clip(lower=0),
                              (rows[f"{metric}_ci_high"] - rows[metric]).clip(lower=0)])
            ax.errorbar(rows.noise + (i - (len(methods) - 1) / 2) * step, rows[metric], yerr=np.nan_to_num(yerr),
                        marker=MARKERS[i % 7], linestyle=DASHES[i % 4], capsize=3, label=method)
        reference = base[metric].iloc[0] if len(base) else chance
        ax.axhline(reference, color="grey", linestyle="--", label="base (untrained)" if len(base) else "chance")
        ax.set_xlabel("noise rate ε of the training labels", fontsize=9)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    outside_legend(fig, axes[0][0])
    fig.suptitle(f"clean held-out pairs; error bars: {level_text(level)} bootstrap CI over pairs and seeds", fontsize=9)
    return fig


def smoothed_accuracy(log: pd.DataFrame, acc: str, n: str, window: int) -> pd.Series:
    """Pair accuracy over a trailing window of steps, weighted by the number of pairs of each kind per batch
    (a batch may hold no flipped pair at all)."""
    correct = (log[acc].fillna(0) * log[n]).rolling(window, min_periods=1).sum()
    total = log[n].rolling(window, min_periods=1).sum()
    return correct / total.where(total > 0)


def plot_training_curves(logs: pd.DataFrame):
    noises = sorted(logs.noise.unique())
    methods = sorted(logs.method.unique())
    fig, axes = plt.subplots(len(noises), 2, figsize=(10, 3.0 * len(noises) + 0.4), squeeze=False,
                             layout="constrained")
    window = max(1, int(logs.step.max()) // 10)
    for row, noise in zip(axes, noises):
        for i, method in enumerate(methods):
            runs = logs[(logs.noise == noise) & (logs.method == method)]
            if runs.empty:
                continue
            per_seed = []
            for _, run in runs.groupby("seed"):
                run = run.sort_values("step").reset_index(drop=True)
                per_seed.append(pd.DataFrame({"step": run.step, "loss": run.loss,
                                              "clean": smoothed_accuracy(run, "acc_clean", "n_clean", window),
                                              "flipped": smoothed_accuracy(run, "acc_flipped", "n_flipped", window)}))
            mean = pd.concat(per_seed).groupby("step").mean()
            colour = f"C{i}"
            row[0].plot(mean.index, mean.loss, color=colour, label=method)
            row[1].plot(mean.index, mean.clean, color=colour, label=f"{method} clean")
            if mean.flipped.notna().any():
                row[1].plot(mean.index, mean.flipped, color=colour, linestyle="--", label=f"{method} flipped")
        row[0].set_ylabel("loss")
        row[1].set_ylabel(f"pair accuracy ({window}-step window)")
        row[1].set_ylim(-0.02, 1.02)
        for ax in row:
            ax.set_title(f"noise ε = {noise:g}")
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    # one legend for every panel: a colour per method, solid clean and dashed flipped pairs
    handles = [plt.Line2D([], [], color=f"C{i}", label=m) for i, m in enumerate(methods)]
    handles += [plt.Line2D([], [], color="k", label="clean pairs"),
                plt.Line2D([], [], color="k", linestyle="--", label="flipped pairs")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(f"training curves, mean over {logs.seed.nunique()} seed(s)", fontsize=10)
    return fig


def plot_subspace(summary: pd.DataFrame):
    missing = {"layer", "selected", "neurons"} - set(summary.columns)
    if missing:
        raise ValueError(f"subspace summary has no column(s) {sorted(missing)}")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(summary) + 2), 3.2), layout="constrained")
    ax.bar(summary.layer.astype(str), summary.selected, color="C2")
    ax.set_xlabel("layer")
    ax.set_ylabel("selected neurons")
    total = int(summary.selected.sum())
    ax.set_title(f"probe-selected MLP neurons: {total} of {int(summary.neurons.sum())}")
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_refusal_vs_harmful(rates: pd.DataFrame):
    """x: harmful rate averaged over the harmful benchmarks; y: refusal rate averaged over the harmless ones."""
    harmful = rates[rates.kind == "harmful"].groupby(["method", "noise"], dropna=False).rate.mean()
    harmless = rates[rates.kind == "harmless"].groupby(["method", "noise"], dropna=False).rate.mean()
    if harmful.empty or harmless.empty:
        raise ValueError("refusal-vs-harmful scatter: needs a harmful and a harmless (over-refusal) benchmark")
    both = pd.concat({"harmful": harmful, "refusal": harmless}, axis=1).dropna().reset_index()
    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    noises = sorted(both.noise.dropna().unique())
    for i, method in enumerate(sorted(both.method.unique())):
        pts = both[both.method == method]
        colour = "grey" if method == "base" else f"C{i}"
        for _, p in pts.iterrows():
            marker = "*" if pd.isna(p.noise) else MARKERS[noises.index(p.noise) % 7]
            ax.scatter(p.harmful, p.refusal, color=colour, marker=marker, s=60)
        ax.plot(pts.harmful, pts.refusal, color=colour, alpha=0.5, label=method)
    for j, noise in enumerate(noises):
        ax.scatter([], [], color="k", marker=MARKERS[j % 7], label=f"ε = {noise:g}")
    ax.set_xlabel(f"harmful benchmarks: {metric_label(rates[rates.kind == 'harmful'])}", fontsize=8)
    ax.set_ylabel(f"over-refusal benchmarks: {metric_label(rates[rates.kind == 'harmless'])}", fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _symlog_strip(ax, groups: list[np.ndarray], linthresh: float) -> None:
    """Every value as a jittered point and the median as a bar, one column per group, on a symlog axis (zeros
    are common here: a move that rounds away leaves ΔL, the changed fraction and 1 − cos at exactly 0)."""
    rng = np.random.default_rng(0)
    for i, values in enumerate(groups):
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        ax.scatter(i + rng.uniform(-0.18, 0.18, len(values)), values, s=12, alpha=0.6, color=f"C{i % 10}")
        ax.hlines(np.median(values), i - 0.3, i + 0.3, color="k", linewidth=2)
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.grid(alpha=0.3, axis="y")


def symlog_limits(values, linthresh: float, pad: float = 4.0) -> tuple[float, float]:
    """y limits of a symlog axis that hold every value, 0 and each threshold (a threshold line a caption names
    must lie inside its axis), with a factor ``pad`` of room beyond the largest magnitude on each side."""
    values = np.asarray([v for v in values if np.isfinite(v)] + [0.0], dtype=float)
    low, high = values.min(), values.max()
    high = high * pad if high > linthresh else (linthresh if high > 0 else 0.0)
    low = low * pad if low < -linthresh else (-linthresh if low < 0 else 0.0)
    if high == low:  # nothing but zeros: one linear unit above 0
        high = linthresh
    return float(low), float(high)


def _thin_symlog_ticks(ax, linthresh: float, most: int = 5) -> None:
    """At most ``most`` decade ticks on each side of 0 (a symlog axis spanning 1e-15..1e-4 would label 12)."""
    low, high = ax.get_ylim()
    ticks = [0.0]
    for sign, end in ((1, high), (-1, -low)):
        if end <= linthresh:
            continue
        decades = np.arange(np.floor(np.log10(linthresh)), np.floor(np.log10(end)) + 1)
        step = int(np.ceil(len(decades) / most))
        ticks += [sign * 10.0 ** d for d in decades[::-1][::step]]
    ax.set_yticks(sorted(ticks))
    ax.set_ylim(low, high)


def plot_perturbation(logs: pd.DataFrame, max_fraction: float, max_gap: float):
    """Per method with sharpness-aware steps: ΔL, effective-move fraction and 1 − gradient cosine over its steps
    (noise rates and seeds pooled); dashed: the thresholds below which (either) a method is reported inert."""
    missing = {"loss_perturbed", "sharpness_step", "effective_fraction", "grad_cosine"} - set(logs.columns)
    if missing:
        raise ValueError(f"training logs have no column(s) {sorted(missing)}: rerun train_policy")
    sharp = logs[logs.sharpness_step.astype(str).str.lower().eq("true")]
    methods = sorted(sharp.method.unique())
    # a column of points per method, vertical method names below it (rotated labels of neighbours would overlap)
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 3 * (0.4 * len(methods) + 1.6)), 4.4), squeeze=False,
                             layout="constrained")
    axes = axes[0]
    if not methods:
        for ax in axes:
            ax.text(0.5, 0.5, "no sharpness-aware\nstep in any run", ha="center", va="center", transform=ax.transAxes)
    by = [sharp[sharp.method == m] for m in methods]
    # linear near 0 only below the smallest values these take (a gradient cosine of 1 − 1e-13 in fp32)
    panels = [("ΔL = L(θ+δ) − L(θ)", [(r.loss_perturbed - r.loss).to_numpy(float) for r in by], 1e-9, None),
              ("fraction of moved weights\nchanged (compute precision)",
               [r.effective_fraction.to_numpy(float) for r in by], 1e-6, max_fraction),
              ("1 − cos(∇L(θ), ∇L(θ+δ))", [(1 - r.grad_cosine).to_numpy(float) for r in by], 1e-15, max_gap)]
    for ax, (title, groups, linthresh, threshold) in zip(axes, panels):
        _symlog_strip(ax, groups, linthresh)
        extra = [] if threshold is None else [threshold]
        ax.set_ylim(*symlog_limits(np.concatenate(groups + [np.asarray(extra, float)]), linthresh))
        if threshold is not None:
            ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, gid=THRESHOLD)
            ax.annotate(f"inert below {threshold:g}", (1.0, threshold), xycoords=("axes fraction", "data"),
                        xytext=(-2, 2), textcoords="offset points", ha="right", va="bottom", fontsize=7, color="grey")
        _thin_symlog_ticks(ax, linthresh)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(methods)), methods, rotation=90, fontsize=8)
        ax.set_xlim(-0.6, max(len(methods), 1) - 0.4)
    fig.suptitle("sharpness-aware steps: a point per step (noise rates and seeds pooled), bar = median; symlog axes",
                 fontsize=9)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", required=True, help="main table (workflow.stats harmful_rate.csv)")
    p.add_argument("--train-logs", nargs="+", required=True, help="<method>/noise<ε>/seed<s>.train_log.tsv files")
    p.add_argument("--subspace", required=True, help="results/subspace/summary.tsv")
    p.add_argument("--figures", required=True, help="output folder")
    p.add_argument("--scatter", action="store_true", help="also the over-refusal vs harmful-rate scatter")
    p.add_argument("--preferences", help="held-out preference table (workflow.stats preference_accuracy.csv): "
                   "also preference_accuracy_vs_noise")
    p.add_argument("--perturbation", action="store_true", help="also the sharpness-aware steps' diagnostics")
    p.add_argument("--ci-level", type=float, default=schema_default("report/ci_level"),
                   help="confidence level of the CIs in the tables (named in the figures and their captions)")
    p.add_argument("--inert-effective-fraction", type=float, default=schema_default("report/inert_effective_fraction"))
    p.add_argument("--inert-cosine-gap", type=float, default=schema_default("report/inert_cosine_gap"))
    a = p.parse_args(argv)

    out = Path(a.figures)
    captions = figure_captions(a.ci_level, a.inert_effective_fraction, a.inert_cosine_gap)

    def draw(name, fig):
        save(fig, out / name, captions[name])

    rates = pd.read_csv(a.rates)
    draw("harmful_rate_vs_noise", plot_rates_vs_noise(rates, a.ci_level))
    logs = read_train_logs(a.train_logs, ["step", "loss", "acc_clean", "acc_flipped", "n_clean", "n_flipped"])
    draw("training_curves", plot_training_curves(logs))
    if a.perturbation:
        draw("perturbation_effect", plot_perturbation(logs, a.inert_effective_fraction, a.inert_cosine_gap))
    draw("subspace_neurons", plot_subspace(pd.read_csv(a.subspace, sep="\t")))
    if a.scatter:
        draw("refusal_vs_harmful", plot_refusal_vs_harmful(rates))
    if a.preferences:
        draw("preference_accuracy_vs_noise", plot_preferences_vs_noise(pd.read_csv(a.preferences), a.ci_level))


if __name__ == "__main__":
    main()
