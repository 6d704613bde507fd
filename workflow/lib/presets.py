"""What a method preset brings into the DAG: the subspace, the reward stage, the sharpness section of the report,
β of its held-out margin. Read by the rule files at parse time and by the stages that need the same answer."""
from __future__ import annotations


def reads_subspace(preset: dict) -> bool:
    """Whether a preset's sharpness-aware step needs the probe-selected neurons: it perturbs them (probe), as many
    random ones (random), or moves as far as the probe-subspace step would (perturbation matched)."""
    s = preset.get("sharpness")
    return bool(s) and (s["subspace"] in ("probe", "random") or s["perturbation"] == "matched")


def sharpness_methods(config: dict) -> list[str]:
    """The methods trained with a sharpness-aware step (the report's "Is the perturbation effective?" section)."""
    return [m for m in config["methods"] if "sharpness" in config["presets"][m]]


def uses_reward(preset: dict) -> bool:
    """Whether a preset is reward-level (soft labels from the reward model: key reward_labels)."""
    return "reward_labels" in preset


def preference_beta(config: dict, method: str) -> float:
    """β of the held-out preference margin of a model: its method preset's β; for the base model (margin 0
    unless an SFT model is the reference) the β of report.reference_method, else of the first method."""
    if method == "base":
        method = config["report"]["reference_method"]
        method = method if method in config["presets"] else config["methods"][0]
    return float(config["presets"][method]["beta"])


def reward_beta_r_values(config: dict) -> list[float]:
    """β_r values plotted: reward_model.beta_r_plot plus those of the reward-level methods being trained."""
    methods = [config["presets"][m]["reward_labels"]["beta_r"] for m in config["methods"]
               if uses_reward(config["presets"][m])]
    return sorted(set(map(float, config["reward_model"]["beta_r_plot"] + methods)))
