"""Every stage module is runnable on its own: ``python -m workflow.<stage> --help`` shows its exact command."""
import importlib
import pkgutil
import subprocess
import sys

import pytest

import workflow
from conftest import ROOT

# every module of the workflow package with a command-line entry point (a new stage is covered automatically)
STAGES = sorted(m.name for m in pkgutil.iter_modules(workflow.__path__)
                if hasattr(importlib.import_module(f"workflow.{m.name}"), "main"))


def test_the_stages_are_found():
    assert {"prepare_model", "train_policy", "generate", "judge", "stats", "report", "sft", "convert_score_model"} <= set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_help(stage, capsys):
    module = importlib.import_module(f"workflow.{stage}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m workflow.{stage}" in out  # the docstring shows the exact command


@pytest.mark.workflow
def test_a_stage_runs_as_a_module_from_the_shell():
    proc = subprocess.run([sys.executable, "-m", "workflow.stats", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "python -m workflow.stats" in proc.stdout
