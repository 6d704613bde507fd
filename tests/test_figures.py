"""The report's figures can be read: at the default config's shape and at 3 methods x 3 noise rates, no two texts
of a figure overlap, every text lies inside the figure, every threshold the caption names lies inside its axis, and
the CI level named is the configured one. Drawn from tables built here (the plot functions take frames)."""
from unittest import mock

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from workflow import figures
from workflow.lib.captions import figure_captions

NO_REFUSAL = "no-refusal rate (refusal markers: refusal, not harm)"
OVER_REFUSAL = "over-refusal rate (refusal markers)"
# (methods, noise rates, seeds): the default config's shape, and a 3 x 3 grid
SHAPES = {"default": (["dpo", "shapo"], [0.0, 0.4], [0]),
          "3x3": (["dpo", "shapo", "shapo_normalized"], [0.0, 0.2, 0.4], [0, 1, 2])}
BENCHMARKS = {"harmbench": "harmful", "donotanswer": "harmful", "harmless": "harmless"}


def drawn_texts(fig) -> list[tuple[str, object]]:
    """(text, window extent) of every text the renderer actually drew (a tick outside the view is not drawn)."""
    drawn, draw = [], Text.draw

    def record(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    with mock.patch.object(Text, "draw", record):
        fig.canvas.draw()
    return drawn


def overlaps(texts) -> list[tuple[str, str]]:
    clash = []
    for i, (a, box_a) in enumerate(texts):
        for b, box_b in texts[i + 1:]:
            if box_a.x0 < box_b.x1 - 1 and box_b.x0 < box_a.x1 - 1 and box_a.y0 < box_b.y1 - 1 and box_b.y0 < box_a.y1 - 1:
                clash.append((a, b))
    return clash


def assert_readable(fig, name: str) -> None:
    texts = drawn_texts(fig)
    assert texts, f"{name}: nothing drawn"
    clash = overlaps(texts)
    assert not clash, f"{name}: overlapping texts {clash[:5]}"
    canvas = fig.bbox
    outside = [t for t, box in texts if box.x0 < canvas.x0 - 1 or box.x1 > canvas.x1 + 1
               or box.y0 < canvas.y0 - 1 or box.y1 > canvas.y1 + 1]
    assert not outside, f"{name}: texts cut off at the figure's edge: {outside}"


def threshold_lines(fig) -> list[tuple[float, tuple[float, float]]]:
    """(y, axis y limits) of every line marked as a threshold."""
    return [(line.get_ydata()[0], ax.get_ylim()) for ax in fig.axes for line in ax.get_lines()
            if line.get_gid() == figures.THRESHOLD]


def rates_table(methods, noises, seeds) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [dict(method="base", noise=np.nan, benchmark=b, kind=k) for b, k in BENCHMARKS.items()]
    rows += [dict(method=m, noise=n, benchmark=b, kind=k) for m in methods for n in noises for b, k in BENCHMARKS.items()]
    table = pd.DataFrame(rows)
    rate = rng.uniform(0.2, 0.9, len(table))
    return table.assign(metric_label=[OVER_REFUSAL if k == "harmless" else NO_REFUSAL for k in table.kind], rate=rate,
                        ci_low=rate - 0.1, ci_high=np.minimum(rate + 0.1, 1.0), seeds=len(seeds))


def preference_table(methods, noises) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = [dict(method="base", noise=np.nan, accuracy=0.5, mean_margin=0.0)]
    rows += [dict(method=m, noise=n, accuracy=rng.uniform(0.4, 0.7), mean_margin=rng.uniform(-0.05, 0.1))
             for m in methods for n in noises]
    table = pd.DataFrame(rows)
    for metric, half in (("accuracy", 0.08), ("mean_margin", 0.02)):
        table[f"{metric}_ci_low"], table[f"{metric}_ci_high"] = table[metric] - half, table[metric] + half
    return table


def train_logs(methods, noises, seeds, steps=16, interval=5) -> pd.DataFrame:
    """Training logs; the sharpness-aware methods take a step every ``interval`` steps. shapo is the default's
    inert raw step (ΔL −1e-7, 1 − cos 5e-12: every value far below the 1e-6 threshold), shapo_normalized an
    effective one."""
    rng = np.random.default_rng(2)
    rows = []
    for m in methods:
        for n in noises:
            for s in seeds:
                for step in range(1, steps + 1):
                    sharp = m != "dpo" and step % interval == 0
                    inert = m == "shapo"
                    rows.append(dict(
                        method=m, noise=n, seed=s, step=step, loss=0.69 - 0.01 * step, acc_clean=rng.uniform(0.4, 1),
                        acc_flipped=rng.uniform(0, 0.6) if n else np.nan, n_clean=4, n_flipped=round(4 * n),
                        sharpness_step=sharp,
                        loss_perturbed=(0.69 - 0.01 * step + (-1e-7 if inert else 0.02) * rng.uniform(0.5, 1.5))
                        if sharp else np.nan,
                        effective_fraction=(0.79 if inert else 1.0) if sharp else np.nan,
                        grad_cosine=(1 - (5e-12 if inert else 6e-5) * rng.uniform(0.5, 1.5)) if sharp else np.nan))
    return pd.DataFrame(rows)


def subspace_summary(layers: int) -> pd.DataFrame:
    return pd.DataFrame({"layer": range(layers), "neurons": 1536, "selected": np.arange(layers) % 7 * 20})


def perturbation_figure(shape: str, fraction: float, gap: float):
    return figures.plot_perturbation(train_logs(*SHAPES[shape]), fraction, gap)


def every_figure(shape: str, level: float) -> dict:
    methods, noises, seeds = SHAPES[shape]
    rates = rates_table(methods, noises, seeds)
    logs = train_logs(methods, noises, seeds)
    return {"harmful_rate_vs_noise": figures.plot_rates_vs_noise(rates, level),
            "preference_accuracy_vs_noise": figures.plot_preferences_vs_noise(preference_table(methods, noises), level),
            "training_curves": figures.plot_training_curves(logs),
            "subspace_neurons": figures.plot_subspace(subspace_summary(30 if shape == "default" else 2)),
            "refusal_vs_harmful": figures.plot_refusal_vs_harmful(rates),
            "perturbation_effect": figures.plot_perturbation(logs, 1e-3, 1e-6)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_no_text_of_a_figure_overlaps_another_or_leaves_the_figure(shape):
    for name, fig in every_figure(shape, 0.95).items():
        assert_readable(fig, f"{shape}/{name}")
        plt.close(fig)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_threshold_the_caption_names_lies_inside_its_axis(shape):
    """The default's inert shapo has every 1 − cos near 5e-12 and its changed fraction near 0.8: the thresholds
    (1e-6, 1e-3) lie above and below its points, and both lines must still be drawn inside their axes."""
    for fraction, gap in ((1e-3, 1e-6), (0.9, 1e-14)):
        fig = perturbation_figure(shape, fraction, gap)
        fig.canvas.draw()
        lines = threshold_lines(fig)
        caption = figure_captions(0.95, fraction, gap)["perturbation_effect"]
        assert sorted(y for y, _ in lines) == sorted([fraction, gap])
        for y, (low, high) in lines:
            assert f"{y:g}" in caption
            assert low <= y <= high, f"threshold {y:g} outside its axis [{low:g}, {high:g}]"
        plt.close(fig)


def test_the_figures_name_the_configured_ci_level():
    for name, fig in every_figure("default", 0.9).items():
        text = " ".join(t for t, _ in drawn_texts(fig))
        assert "95%" not in text, name
        if "CI" in text:
            assert "90% bootstrap CI" in text, name
        plt.close(fig)
    for name, caption in figure_captions(0.9, 1e-3, 1e-6).items():
        assert "95%" not in caption and ("CI" not in caption or "90% bootstrap CI" in caption), name
