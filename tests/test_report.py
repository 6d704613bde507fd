"""The report: rendered from the tiny run (sections, figures, provenance), rerendered alone, and its verdict."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import browser
import matplotlib.image
import pandas as pd
import pytest
import yaml
from filelock import FileLock
from PIL import Image

from conftest import ROOT, copy_run, jobs_run, run_snakemake
from workflow import figures, stats
from workflow.lib.captions import figure_captions, table_captions
from workflow.report import claim_statement

SECTIONS = ["Verdicts", "Headline figures", "What the numbers say", "Main table", "Held-out preference accuracy",
            "Comparisons with dpo", "Is the perturbation effective?", "More figures", "Per-category rates",
            "Judge agreement", "Probe, subspace and decontamination", "Training data and label noise",
            "Provenance", "Configuration"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    with Image.open(path) as img:
        img.verify()
    assert matplotlib.image.imread(path).shape[0] > 100


def test_report_renders_from_the_tiny_run(reference_run):
    workdir, proc = reference_run
    assert {"report_tables", "report_figures", "report"} <= set(jobs_run(proc))
    md = (workdir / "results/report.md").read_text()
    page = (workdir / "results/report.html").read_text()
    for section in SECTIONS:
        assert f"## {section}\n" in md and f">{section}</h2>" in page, section
    # every figure: a PNG that PIL and matplotlib read, a PDF beside it, linked from report.md, embedded in the page
    names = ("harmful_rate_vs_noise", "training_curves", "subspace_neurons", "preference_accuracy_vs_noise",
             "perturbation_effect")
    for name in names:
        assert_valid_png(workdir / f"results/figures/{name}.png")
        assert (workdir / f"results/figures/{name}.pdf").read_bytes().startswith(b"%PDF")
        assert f"](figures/{name}.png)" in md and f"(figures/{name}.pdf)" in md
    assert page.count('src="data:image/png;base64,') == len(names)
    assert not (workdir / "results/figures/refusal_vs_harmful.png").exists()  # no over-refusal benchmark here
    # the main table and the comparisons, from the numbers: the tiny model never refuses, so nothing differs
    assert "| shapo | 0.25 | 1.000 ± 0.000 [1.00, 1.00] |" not in md  # one seed: no ± std
    assert "| shapo | 0.25 | 1.000 [1.00, 1.00] | 1.000 [1.00, 1.00] |" in md
    # the refusal-marker judge is named as measuring refusal, not harm, wherever its numbers are shown
    assert "| method | noise | donotanswer: no-refusal rate (refusal markers: refusal, not harm) | harmbench: " in md
    assert "The primary judge refusal_markers is the refusal-marker judge" in md.split("## Main table")[0]
    assert "Primary judge refusal_markers (type refusal_markers). Rates are over all answers." in md
    assert "| no-refusal rate (refusal markers: refusal, not harm) | 1.000 → 1.000 |" in md  # comparisons
    comp = pd.read_csv(workdir / "results/tables/comparisons.csv")
    assert len(comp) == 4 and set(comp.method) == {"shapo"} and set(comp.reference) == {"dpo"}
    assert (comp["diff"] == 0).all() and (comp.p_holm == 1).all() and not comp.significant.any()
    assert len(pd.read_csv(workdir / "results/tables/mcnemar_by_seed.csv")) == 4
    assert "The paper's claim (shapo lowers the harmful rate under label noise relative to dpo) is not shown" in md
    # identical outcomes: no discordant prompt, so no detectable difference can be estimated (one MDD formula)
    assert "The smallest difference it could detect is not estimable" in md and "1.96·√" not in md
    # the verdict panel leads: the first section, before any table of numbers
    assert md.index("## Verdicts") < md.index("## Headline figures") < md.index("## Main table")
    panel = md.split("## Verdicts\n", 1)[1].split("\n## ", 1)[0]
    assert "| question | compared (↑ ↓: the direction asked) | status | result | 95% CI | why |" in panel
    assert "| Does training work? | dpo ε = 0 vs base: held-out accuracy ↑ | shown | 0.500 → 1.000 (+0.500) |" in panel
    assert "| Is shapo's perturbation effective? | its sharpness-aware steps (medians) | not estimable |" in panel
    # provenance: the fixture file's real sha256, the model's provenance, package versions, the config itself
    fixture = ROOT / "tests/fixtures/harmbench.csv"
    assert hashlib.sha256(fixture.read_bytes()).hexdigest() in md
    assert '"mlp_output_projection": "down_proj"' in md and "| statsmodels | 0.15.0 |" in md
    config_yaml = md.split("## Configuration\n", 1)[1].split("```\n")[1]
    assert yaml.safe_load(config_yaml)["methods"] == ["dpo", "shapo"]
    assert "| unsafe | harmbench | 1 |" in md  # the decontamination report
    assert "One judge only (refusal_markers)" in md
    # 3 steps per policy, shapo's interval is 5: the perturbation section says it never ran
    assert "shapo took no sharpness-aware step (interval 5 exceeds the steps of each run), so it trains as dpo" in md


def test_rerendering_after_a_finished_run_runs_only_the_report_rules(reference_run, tmp_path):
    workdir = copy_run(reference_run[0], tmp_path / "run")
    before = (workdir / "results/report.md").read_text()
    proc = run_snakemake(workdir, "--forcerun", "report_tables")
    assert sorted(jobs_run(proc)) == ["all", "report", "report_figures", "report_tables"]
    assert (workdir / "results/report.md").read_text() == before  # seeded bootstrap: the same report


def test_over_refusal_benchmark_is_a_refusal_rate_and_gets_the_scatter(reference_run, tmp_path):
    """donotanswer relabelled as an over-refusal (harmless) set: its metric becomes the refusal rate."""
    judged = tmp_path / "judgements"
    shutil.copytree(reference_run[0] / "results/judgements", judged)
    for summary in judged.rglob("donotanswer.json"):
        summary.write_text(json.dumps(json.loads(summary.read_text()) | {"kind": "harmless"}))
    tables = tmp_path / "tables"
    stats.main(["--judgements", *map(str, sorted(judged.rglob("*.jsonl"))), "--primary-judge", "refusal_markers",
                "--reference-method", "dpo", "--n-bootstrap", "200", "--tables", str(tables)])
    rates = pd.read_csv(tables / "harmful_rate.csv")
    dna = rates[rates.benchmark == "donotanswer"]
    assert set(dna.metric) == {"refusal_rate"} and (dna.rate == 0.0).all()  # the tiny model never refuses
    assert set(rates[rates.benchmark == "harmbench"].metric) == {"harmful_rate"}
    assert "donotanswer: over-refusal rate (refusal markers)" in (tables / "harmful_rate.md").read_text()
    run = reference_run[0] / "results"
    figures.main(["--rates", str(tables / "harmful_rate.csv"), "--subspace", str(run / "subspace/summary.tsv"),
                  "--train-logs", *map(str, sorted((run / "policies").rglob("*.train_log.tsv"))),
                  "--figures", str(tmp_path / "figures"), "--scatter"])
    assert_valid_png(tmp_path / "figures/refusal_vs_harmful.png")


def comparison(method, noise, diff, p_holm, kind="harmful", bench="harmbench", mdd80=0.05):
    return dict(method=method, reference="dpo", noise=noise, benchmark=bench, kind=kind, diff=diff,
                ci_low=diff - 0.05, ci_high=diff + 0.05, p_holm=p_holm, significant=p_holm < 0.05, mdd80=mdd80)


RATES = pd.DataFrame({"method": ["base", "dpo", "shapo"], "seeds": [1, 3, 3], "prompts": [400, 400, 400]})


def test_claim_statement_follows_the_numbers():
    supported = pd.DataFrame([comparison("shapo", 0.0, 0.0, 1.0), comparison("shapo", 0.4, -0.2, 0.001)])
    text = claim_statement(supported, RATES, "dpo", "shapo", 0.05, 0.95)
    assert "is supported by this run" in text and "significantly lower harmful rate than dpo on harmbench at ε = 0.4" \
        in text and "too small" not in text
    against = pd.DataFrame([comparison("shapo", 0.4, 0.2, 0.01)])
    assert "is contradicted by this run" in claim_statement(against, RATES, "dpo", "shapo", 0.05, 0.95)
    null = pd.DataFrame([comparison("shapo", 0.4, -0.02, 0.6), comparison("ipo", 0.4, 0.01, 0.9)])
    text = claim_statement(null, RATES, "dpo", "shapo", 0.05, 0.95)
    assert "is not shown by this run" in text and "no difference in harmful rate between ipo and dpo" in text
    # the detectable difference is the comparisons' own mdd80 (one formula), at the configured α and level
    wide = pd.DataFrame([comparison("shapo", 0.4, -0.02, 0.6, mdd80=0.31), comparison("shapo", 0.0, 0.0, 1, mdd80=0.41)])
    text = claim_statement(wide, RATES, "dpo", "shapo", 0.1, 0.9)
    assert "must be about 0.36 (median; 0.31–0.41 over 2 comparisons) or larger" in text
    assert "two-sided α = 0.1" in text and "90% CIs" in text and "the sample is too small" in text and "95%" not in text
    assert "was not trained in this run" in claim_statement(pd.DataFrame(), RATES, "dpo", "shapo", 0.05, 0.95)


@pytest.mark.workflow
def test_full_config_covers_every_preset_and_benchmark_and_dry_runs(tmp_path):
    default = yaml.safe_load((ROOT / "config.yaml").read_text())
    full = yaml.safe_load((ROOT / "config/full.yaml").read_text())
    missing = set(default["presets"]) - set(full["methods"])
    assert not missing, f"config/full.yaml methods: add the preset(s) {sorted(missing)} (it trains every preset)"
    missing = set(default["benchmarks"]) - set(full["evaluation"]["benchmarks"])
    assert not missing, f"config/full.yaml evaluation.benchmarks: add {sorted(missing)} (it answers every benchmark)"
    assert full["noise"]["rates"] == [0.0, 0.2, 0.4] and len(full["seeds"]) == 3
    # the default's data paths are relative to the project root: ../shared beside the working directory
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                           "--directory", str(tmp_path / "run"), "--configfile", str(ROOT / "config.yaml"),
                           str(ROOT / "config/full.yaml"), "--cores", "2", "-n"],
                          capture_output=True, text=True, cwd=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    policies = len(full["methods"]) * 3 * 3
    counts = {l.split()[0]: int(l.split()[1]) for l in proc.stdout.splitlines()
              if len(l.split()) == 2 and l.split()[1].isdigit()}
    assert counts["train_policy"] == policies and counts["report"] == 1
    judges = full["evaluation"].get("judges", default["evaluation"]["judges"])
    assert counts["judge"] == (policies + 1) * len(full["evaluation"]["benchmarks"]) * len(judges)


def test_optional_sections_judge_agreement_and_reward_level(reference_run, tmp_path):
    """With two judges and a reward-level method the report adds their sections (inputs written by hand here)."""
    from workflow import report

    run = reference_run[0]
    (tmp_path / "agreement.csv").write_text("benchmark,judge_a,judge_b,n,agreement,kappa\n"
                                            "harmbench,refusal_markers,llama_guard_3_1b,3,0.667,0.4\n")
    (tmp_path / "reward.json").write_text(json.dumps({"heldout_pair_accuracy": 0.61}))
    config = yaml.safe_load((run / "config.yaml").read_text())
    args = ["--config-json", json.dumps(config), "--tables", str(run / "results/tables"),
            "--figures", str(run / "results/figures/training_curves.png"), "--reference-method", "dpo",
            "--claim-method", "shapo", "--model-provenance", str(run / "results/models/base/provenance.json"),
            "--probe-metrics", str(run / "results/probe/metrics.json"),
            "--subspace", str(run / "results/subspace/summary.tsv"),
            "--decontamination", str(run / "results/probe/decontamination.tsv"),
            "--preferences", str(run / "results/data/preferences/summary.json"),
            "--noise-summaries", *map(str, sorted((run / "results/data/noisy").rglob("*.json"))),
            "--judge-agreement", str(tmp_path / "agreement.csv"), "--reward-metrics", str(tmp_path / "reward.json"),
            "--markdown", str(tmp_path / "out/report.md"), "--html", str(tmp_path / "out/report.html")]
    report.main(args)
    md = (tmp_path / "out/report.md").read_text()
    assert "| harmbench | refusal_markers | llama_guard_3_1b | 3 | 0.667 | 0.4 |" in md
    assert "## Reward-level training\n" in md and '"heldout_pair_accuracy": 0.61' in md
    assert "One judge only" not in md
    # figures are linked relative to the report's own folder
    assert f"]({os.path.relpath(run / 'results/figures/training_curves.png', tmp_path / 'out')})" in md


# ------------------------------------------------------------------------------ true at any setting; real readers
@pytest.fixture(scope="session")
def report_at_90(reference_run, tmp_path_factory):
    """The reference run with report.ci_level 0.9 and α 0.1, rerun to the report (only the report rules rerun);
    then `snakemake --report report.zip` on it. Shared by every worker, like the reference run."""
    from conftest import SharedRun, session_dir

    config = yaml.safe_load((reference_run[0] / "config.yaml").read_text())
    config["report"].update(ci_level=0.9, alpha=0.1)
    workdir, proc = SharedRun(session_dir(tmp_path_factory) / "report-at-90").start_once(
        config, copy_of=reference_run[0]).result()
    with FileLock(f"{workdir}.zip.lock"):
        if not (workdir / "report.zip").exists():
            run_snakemake(workdir, "--report", "report.zip")
    return workdir, proc


def png_caption(path) -> str:
    with Image.open(path) as img:
        return img.text.get("Description", "")


def test_the_configured_ci_level_and_alpha_reach_every_page_header_and_caption(report_at_90):
    """ci_level 0.9: "90%" on every page that shows a CI, in every table header and figure caption that names one,
    and "95%" nowhere; α 0.1 wherever significance is stated."""
    workdir, proc = report_at_90
    assert {"report_tables", "report_figures", "report"} <= set(jobs_run(proc))
    results = workdir / "results"
    pages = {p.relative_to(results): p.read_text() for p in [results / "report.md", results / "report.html",
                                                             *sorted((results / "tables").glob("*.md"))]}
    for name, text in pages.items():
        assert "95%" not in text, f"{name} names 95%"
        if "CI" in text:
            assert "90%" in text, f"{name} shows a CI but not its level"
    headers = re.findall(r"<th>(.*?)</th>", pages[Path("report.html")])
    assert [h for h in headers if "CI" in h] and all("90% CI" in h for h in headers if "CI" in h), headers
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", pages[Path("report.html")])
    figures_shown = sorted(results.glob("figures/*.png"))
    assert len(captions) == len(figures_shown) >= 5
    for caption in captions + [png_caption(p) for p in figures_shown]:
        assert "95%" not in caption and ("CI" not in caption or "90% bootstrap CI" in caption), caption
    assert "90% bootstrap CI" in png_caption(results / "figures/harmful_rate_vs_noise.png")
    md = pages[Path("report.md")]
    assert "α = 0.1" in md and "α = 0.05" not in md and "Holm p < 0.1 / 0.02 / 0.002" in md
    assert "z₀.₉₇₅" not in md and "1.96·√" not in md


def test_snakemake_report_holds_the_tables_and_figures_with_their_captions(report_at_90):
    """`snakemake --report report.zip` on the tiny run: every report figure and the main tables are inside, each
    with its caption (at the run's CI level)."""
    workdir, _ = report_at_90
    with zipfile.ZipFile(workdir / "report.zip") as z:
        names = {Path(n).name for n in z.namelist()}
        page = z.read("report/report.html").decode()
    figures_made = {p.name for p in (workdir / "results/figures").glob("*.png")}
    tables = {"harmful_rate.csv", "comparisons.csv", "categories.csv", "preference_accuracy.csv",
              "preference_comparisons.csv", "perturbation.csv", "report.html"}
    assert figures_made | tables <= names, sorted(figures_made | tables - names)
    for caption in (figure_captions(0.9)["harmful_rate_vs_noise"], table_captions(0.9, 0.1)["comparisons"]):
        assert json.dumps(f"<p>{caption}</p>")[1:-1] in page, caption


@pytest.mark.skipif(browser.skip_reason() is not None, reason=str(browser.skip_reason()))
def test_the_report_page_in_a_real_browser(reference_run):
    """Headless Chromium, 1400 x 900: every image loads, the console shows no error, and the verdict panel is on
    the first screen, above the headline figures."""
    page_path = reference_run[0] / "results/report.html"
    where = {"verdicts": "document.querySelector('table.verdicts').getBoundingClientRect().top",
             "first_figure": "document.querySelector('figure').getBoundingClientRect().top",
             "figures": "document.querySelectorAll('figure img').length"}
    with browser.Chromium() as chromium:
        page = chromium.load(page_path, 1400, 900, where)
    assert page.images and all(i["complete"] and i["width"] > 0 for i in page.images), page.images
    assert len(page.images) == page.values["figures"] == page_path.read_text().count("data:image/png;base64,")
    assert page.errors == []
    assert page.values["verdicts"] < 900 and page.values["verdicts"] < page.values["first_figure"]
    assert page.screenshot.startswith(b"\x89PNG")
