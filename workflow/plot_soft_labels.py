"""Plot the reward differences of the training pairs and the soft labels they give for several β_r.

    python -m workflow.plot_soft_labels --rewards results/reward/pair_rewards.jsonl \
        --noisy results/data/noisy/noise0.4/seed0.jsonl --beta-r 0.5 1 2 5 \
        --figure results/figures/reward_soft_labels.png --figure-pdf results/figures/reward_soft_labels.pdf \
        --table results/reward/soft_labels.tsv

Left: the histogram of d = r_chosen − r_rejected on the clean pairs, split into the pairs the
noisy set ``--noisy`` keeps and the ones it flips. Right: the soft labels p = σ(β_r·d_noisy)
that reward-level training sees after noise (d_noisy = −d for a flipped pair), one histogram
per β_r. The table gives, per β_r, the mean soft label, the share above 0.5, and for the
flipped pairs the share whose soft label favours the original (clean) answer, i.e. corrects
the flip.
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from workflow.lib.files import atomic_path, read_jsonl, write_tsv


def soft_labels(reward_diff: np.ndarray, beta_r: float) -> np.ndarray:
    """p = σ(β_r·d) (numpy twin of ``workflow.lib.losses.soft_labels``, so this stage needs no torch)."""
    return 1.0 / (1.0 + np.exp(-beta_r * np.asarray(reward_diff, dtype=float)))


def reward_frame(rewards: list[dict], noisy: list[dict], path: str) -> pd.DataFrame:
    """pair_id, d (clean orientation), flipped, d_noisy (the orientation training sees)."""
    flipped = {r["pair_id"]: bool(r.get("flipped", False)) for r in noisy}
    missing = [r["pair_id"] for r in rewards if r["pair_id"] not in flipped]
    if missing:
        raise ValueError(f"{path}: no pair {missing[0]!r} (and {len(missing) - 1} more) of the reward file")
    frame = pd.DataFrame({"pair_id": [r["pair_id"] for r in rewards],
                          "d": [r["r_chosen"] - r["r_rejected"] for r in rewards]})
    frame["flipped"] = frame["pair_id"].map(flipped)
    frame["d_noisy"] = np.where(frame["flipped"], -frame["d"], frame["d"])
    return frame


def soft_label_table(frame: pd.DataFrame, betas: list[float]) -> pd.DataFrame:
    rows = []
    for beta_r in betas:
        p = soft_labels(frame["d_noisy"], beta_r)
        flip = frame["flipped"].to_numpy()
        rows.append({"beta_r": beta_r, "mean_p": p.mean(), "frac_p_above_half": float((p > 0.5).mean()),
                     "mean_p_clean": p[~flip].mean() if (~flip).any() else np.nan,
                     "mean_p_flipped": p[flip].mean() if flip.any() else np.nan,
                     "frac_flips_corrected": float((p[flip] < 0.5).mean()) if flip.any() else np.nan,
                     "n_pairs": len(p), "n_flipped": int(flip.sum())})
    return pd.DataFrame(rows)


def plot(frame: pd.DataFrame, betas: list[float], png: str, pdf: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bins = np.histogram_bin_edges(frame["d"], bins=min(30, max(5, len(frame) // 4)))
    flip = frame["flipped"].to_numpy()
    left.hist([frame["d"][~flip], frame["d"][flip]], bins=bins, stacked=True,
              label=[f"kept ({(~flip).sum()})", f"flipped by noise ({flip.sum()})"])
    left.axvline(0, color="k", lw=0.8)
    left.set(xlabel="r(chosen) − r(rejected), clean orientation", ylabel="pairs", title="Reward differences")
    left.legend()
    for beta_r in betas:
        right.hist(soft_labels(frame["d_noisy"], beta_r), bins=np.linspace(0, 1, 21), histtype="step", lw=1.5,
                   label=f"β_r = {beta_r:g}")
    right.axvline(0.5, color="k", lw=0.8)
    right.set(xlabel="soft label p = σ(β_r·d) after noise", ylabel="pairs", title="Soft labels")
    right.legend()
    fig.tight_layout()
    for path in (png, pdf):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.rsplit(".", 1)[-1], dpi=150)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", required=True, help="pair_rewards.jsonl from workflow.reward_model")
    p.add_argument("--noisy", required=True, help="a noisy training set (marks the flipped pairs)")
    p.add_argument("--beta-r", type=float, nargs="+", required=True)
    p.add_argument("--figure", required=True, help="PNG")
    p.add_argument("--figure-pdf", required=True, help="PDF")
    p.add_argument("--table", required=True, help="summary per β_r (TSV)")
    a = p.parse_args(argv)
    frame = reward_frame(read_jsonl(a.rewards), read_jsonl(a.noisy), a.noisy)
    table = soft_label_table(frame, a.beta_r)
    write_tsv(a.table, table)
    plot(frame, a.beta_r, a.figure, a.figure_pdf)
    print(table.to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
