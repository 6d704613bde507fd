"""Progress lines in job logs: one line per update (no carriage returns), with a rate and an ETA."""
from workflow.lib.progress import progress


def test_a_log_gets_whole_lines_with_rate_and_eta(capsys, monkeypatch):
    monkeypatch.setenv("SHAPO_PROGRESS_SECONDS", "0")
    for _ in progress(range(4), total=4, desc="generate", unit="batch"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert len(lines) >= 2 and lines[-1].startswith("generate: 100%") and "4/4" in lines[-1]
    assert "batch/s" in lines[-1] or "s/batch" in lines[-1]
    assert "<" in lines[1]  # elapsed<remaining: the ETA


def test_updates_are_rate_limited(capsys, monkeypatch):
    monkeypatch.setenv("SHAPO_PROGRESS_SECONDS", "3600")
    for _ in progress(range(1000), total=1000, desc="train", unit="step"):
        pass
    assert len(capsys.readouterr().err.strip().splitlines()) <= 3  # start, (maybe one), end
