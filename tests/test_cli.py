"""Every stage module is runnable on its own: ``python -m workflow.<stage> --help``."""
import importlib

import pytest

STAGES = ["prepare_model", "prepare_preferences", "inject_noise", "prepare_benchmark", "sample_benchmark", "probe_data", "train_probe",
          "select_subspace", "reference_logps", "train_policy", "generate", "judge", "report", "reward_model",
          "plot_soft_labels", "sft", "judge_agreement", "stats", "figures", "convert_score_model"]


@pytest.mark.parametrize("stage", STAGES)
def test_help(stage, capsys):
    module = importlib.import_module(f"workflow.{stage}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m workflow.{stage}" in out  # the docstring shows the exact command
