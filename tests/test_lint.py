"""`snakemake --lint` finds nothing to flag, on the default config (from the project root, as a user runs
it) and on the tiny test config (--directory elsewhere, absolute data paths)."""
import subprocess
import sys

import pytest

from conftest import ROOT, SNAKEMAKE_ENV, run_snakemake

CLEAN = "Congratulations, your workflow is in a good condition!"


@pytest.mark.workflow
def test_lint_default_config():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--cores", "1"], capture_output=True, text=True,
                          cwd=ROOT, env=SNAKEMAKE_ENV)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and CLEAN in out, out[-6000:]


def test_lint_tiny_config(workdir):
    proc = run_snakemake(workdir, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and CLEAN in out, out[-6000:]
    assert not (workdir / "results").exists()
