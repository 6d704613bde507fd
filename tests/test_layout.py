"""The repository's shape: stage modules apart from the library, rule files that read only common.smk and their
own names, and every package the workflow imports pinned."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import ROOT

WORKFLOW = ROOT / "workflow"
# optional back-ends, imported only where they are installed (a GPU machine); config checks say so when missing
OPTIONAL = {"vllm"}
# commands a user runs, not stages (no rule runs them): the cost projection before submission (docs/cost.md)
COMMANDS = {"plan"}
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "sklearn": "scikit-learn", "jinja2": "jinja2"}


def stages() -> set[str]:
    return {p.stem for p in WORKFLOW.glob("*.py") if p.stem != "__init__"} - COMMANDS


def imported_modules(path) -> set[str]:
    """Absolute module names a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module in ("workflow", "workflow.lib"):  # from workflow import judge
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_every_stage_is_run_by_a_rule_and_every_rule_runs_a_stage():
    run = set(re.findall(r"-m workflow\.(\w+)", "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))))
    assert run == stages(), f"stages no rule runs: {stages() - run}; rules running a non-stage: {run - stages()}"


def test_no_stage_imports_another_stage():
    offenders = []
    for stage in sorted(stages() | COMMANDS):  # a command reads the library only, too
        for module in imported_modules(WORKFLOW / f"{stage}.py"):
            parts = module.split(".")
            if parts[0] == "workflow" and len(parts) > 1 and parts[1] in stages() and parts[1] != stage:
                offenders.append(f"workflow/{stage}.py imports {module}")
    assert not offenders, "a stage needing another stage's function finds it in workflow/lib instead:\n" + "\n".join(offenders)


def test_the_library_imports_no_stage():
    offenders = [f"{p.relative_to(ROOT)} imports {m}" for p in sorted((WORKFLOW / "lib").glob("*.py"))
                 for m in imported_modules(p) if m.split(".")[:1] == ["workflow"] and len(m.split(".")) > 1
                 and m.split(".")[1] != "lib"]
    assert not offenders, "\n".join(offenders)


def rule_file_names(text: str) -> tuple[set[str], set[str]]:
    """(names a rule file defines at top level: UPPER_CASE globals and functions, every identifier it uses)."""
    defined = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", text, re.M)) | set(re.findall(r"^def (\w+)", text, re.M))
    return defined, set(re.findall(r"\b[A-Za-z_]\w*\b", text))


def test_rule_files_read_only_common_smk_and_their_own_names():
    files = {p.name: p.read_text() for p in (ROOT / "rules").glob("*.smk")}
    owner = {name: f for f, text in files.items() if f != "common.smk" for name in rule_file_names(text)[0]}
    offenders = [f"rules/{f} uses {name}, defined in rules/{owner[name]}" for f, text in files.items()
                 for name in sorted(rule_file_names(text)[1]) if name in owner and owner[name] != f]
    assert not offenders, "move a name two rule files share into rules/common.smk:\n" + "\n".join(offenders)


def requirement_pins() -> set[str]:
    return {re.split(r"[=<>\[]", line)[0].strip().lower().replace("_", "-")
            for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}


def test_every_package_the_workflow_imports_is_pinned():
    pinned = requirement_pins()
    imported = {m.split(".")[0] for p in WORKFLOW.rglob("*.py") for m in imported_modules(p)}
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("workflow", "__future__")}
    missing = sorted(m for m in third_party - OPTIONAL if DISTRIBUTION.get(m, m).lower().replace("_", "-") not in pinned)
    assert not missing, f"imported by workflow/ but not pinned in requirements.txt (and envs/): {missing}"


# modules no test imports directly, and the tests that exercise them (through their one caller, or as a command)
THROUGH_CALLER = {"workflow.plan": "test_plan.py (python -m workflow.plan)",
                  "workflow.lib.dag": "test_plan.py (workflow.plan)",
                  "workflow.lib.document": "test_report.py (workflow.report, in Chromium too)",
                  "workflow.lib.provenance": "test_report.py (workflow.report)"}


def test_every_module_is_imported_by_a_test():
    """Unit tests by module: each module's tests import it (tests/test_<module>.py where it has its own file)."""
    modules = {f"workflow.{p.stem}" for p in WORKFLOW.glob("*.py")} | {
        f"workflow.lib.{p.stem}" for p in (WORKFLOW / "lib").glob("*.py")}
    modules -= {"workflow.__init__", "workflow.lib.__init__"}
    tested = set().union(*(imported_modules(p) for p in (ROOT / "tests").glob("*.py")))
    untested = modules - tested - set(THROUGH_CALLER)
    assert not untested, f"modules no test imports: {sorted(untested)} (add tests, or name their caller's tests)"
    assert not set(THROUGH_CALLER) & tested, "a module in THROUGH_CALLER is now imported by a test: drop it there"


# Every Snakemake start (each run, each dry run, each Slurm job's own Snakemake) parses the rule files and
# imports what they import; statistics and model libraries there would cost seconds per start, on every
# submission of a cluster run.
HEAVY_FOR_THE_RULE_FILES = ("scipy", "statsmodels", "torch", "transformers", "matplotlib", "sklearn")


def test_the_rule_files_import_no_statistics_or_model_library():
    modules = sorted({m for p in [ROOT / "Snakefile", *(ROOT / "rules").glob("*.smk")]
                      for m in re.findall(r"^\s*from (workflow\.[\w.]+) import", p.read_text(), re.M)})
    assert "workflow.lib.captions" in modules and "workflow.lib.config" in modules  # what the rule files read
    probe = (f"import sys; import {', '.join(modules)}; "
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY_FOR_THE_RULE_FILES)!r}))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert loaded.strip() == "[]", f"the rule files' imports ({modules}) load {loaded.strip()}: import them lazily"
