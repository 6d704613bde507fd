"""The test helpers' own parsing of Snakemake's output (tests/conftest.py)."""
from __future__ import annotations

from conftest import failed_jobs

# the shape of the CI rehearsal's failure (2026-12-03): the failed job's report, then 10 minutes of other jobs
LOG = """\
Select jobs to execute...
Error in rule train_policy:
    message: None
    jobid: 311
    log: results/logs/train_policy/rho0.5_probe_noise0.4_seed0.log (check log file(s) for error details)
        (command exited with non-zero exit code)
Logfile results/logs/train_policy/rho0.5_probe_noise0.4_seed0.log:
================================================================================
Writing model shards: 100%
terminate called without an active exception
================================================================================
Execute 1 jobs...
localrule judge:
""" + "Finished jobid: 49 (Rule: judge)\n" * 500 + "Exiting because a job execution failed.\n"


def test_failed_jobs_quotes_each_failed_job_to_the_end_of_its_log():
    report = failed_jobs(LOG)
    assert report.startswith("Error in rule train_policy:\n")
    assert "terminate called without an active exception\n====" in report
    assert report.endswith("=" * 80 + "\n[...]\n")  # stops at the end of the job's log
    assert "Execute 1 jobs" not in report and "Finished jobid" not in report
    assert "terminate called" not in LOG[-6000:]  # what the old message showed: the tail alone


def test_failed_jobs_reports_every_failed_job_and_is_empty_without_one():
    assert failed_jobs("Finished jobid: 1\n") == ""
    two = failed_jobs("Error in rule a:\n    jobid: 1\nError in rule b:\n    jobid: 2\n", lines_each=2)
    assert two == "Error in rule a:\n    jobid: 1\n[...]\nError in rule b:\n    jobid: 2\n[...]\n"
