"""docs/fidelity.md cites our own files as ``file:lines (name)``; every such citation must still point at what it
names, so the table cannot drift from the code."""
from __future__ import annotations

import ast
import re

from conftest import ROOT

# our files (official paths such as trainers.py, config/config.yaml or README.md are the authors')
OURS = re.compile(r"^(workflow/[\w/]+\.py|rules/\w+\.smk|tests/\w+\.py|config/(paper|full)\.yaml|config\.yaml|Snakefile)$")
CITATION = re.compile(r"(?P<file>(?<![\w/.])[\w/.-]+\.(?:py|smk|yaml)|Snakefile)?:(?P<lines>\d+(?:-\d+)?(?:, ?\d+(?:-\d+)?)*)")


def parenthesised(text: str, start: int) -> str:
    """The text of a balanced ``( … )`` group that opens at ``text[start]`` (after spaces), or ''."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "(":
        return ""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return ""


def cited_name(code: str) -> str:
    """The identifier a backticked citation names: ``flip_pairs``, ``rates`` of ``rates: [0, .1]``,
    ``max_new_tokens`` of ``max_new_tokens=256``, ``split`` of ``probe.data.source.split: train``."""
    head = re.split(r"[:=(\s\[]", code.strip(), maxsplit=1)[0]
    return head.split(".")[-1]


def citations(text: str):
    """(file, line ranges, names) of every citation of ours; ``:a-b`` after a citation continues its file."""
    for cell_or_line in re.split(r"\|\n|\n", text):
        current = None
        for m in CITATION.finditer(cell_or_line):
            file = m["file"]
            if file:
                current = file
            elif current is None or cell_or_line[max(0, m.start() - 2):m.start()].strip() not in (",", ";", ""):
                continue
            if not current or not OURS.match(current):
                current = None if file else current
                continue
            ranges = [tuple(int(x) for x in part.split("-")) for part in m["lines"].replace(" ", "").split(",")]
            names = [cited_name(c) for c in re.findall(r"`([^`]+)`", parenthesised(cell_or_line, m.end()))]
            yield current, [(r[0], r[-1]) for r in ranges], [n for n in names if re.fullmatch(r"[A-Za-z_]\w*", n)]


def test_the_parser_reads_the_citation_forms_the_document_uses():
    found = list(citations("| x | workflow/train_probe.py:44-57 (`token_lengths`, `length_filter`), :211-218; "
                           "config/paper.yaml:60-61 | trainers.py:12 (`foo`) | config.yaml:79 (`simpo_margin: 0.5`) |"))
    assert found == [("workflow/train_probe.py", [(44, 57)], ["token_lengths", "length_filter"]),
                     ("workflow/train_probe.py", [(211, 218)], []), ("config/paper.yaml", [(60, 61)], []),
                     ("config.yaml", [(79, 79)], ["simpo_margin"])]


def definition_spans(path) -> dict[str, list[tuple[int, int]]]:
    """name -> (first, last line) of every function and class of a Python file, at any depth."""
    spans: dict[str, list[tuple[int, int]]] = {}
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                spans.setdefault(node.name, []).append((node.lineno, node.end_lineno))
    return spans


def names_in_place(lines: list[str], spans: dict, ranges: list[tuple[int, int]], name: str) -> bool:
    """The name is written inside the cited lines, or the cited lines are part of the function it names (a
    citation of a few lines inside a long function)."""
    if any(re.search(rf"\b{re.escape(name)}\b", "\n".join(lines[lo - 1:hi])) for lo, hi in ranges):
        return True
    return any(first <= lo and hi <= last for first, last in spans.get(name, ()) for lo, hi in ranges)


def test_every_citation_of_ours_points_at_what_it_names():
    text = (ROOT / "docs/fidelity.md").read_text()
    problems, checked = [], 0
    for file, ranges, names in citations(text):
        path = ROOT / file
        if not path.exists():
            problems.append(f"{file}: no such file")
            continue
        lines = path.read_text().splitlines()
        for lo, hi in ranges:
            if not 1 <= lo <= hi <= len(lines):
                problems.append(f"{file}:{lo}-{hi}: outside the file ({len(lines)} lines)")
        spans = definition_spans(path)
        for name in names:
            checked += 1
            if not names_in_place(lines, spans, ranges, name):
                where = [i + 1 for i, line in enumerate(lines) if re.search(rf"\b(def|class) {name}\b|^\s*{name}\s*[:=]", line)]
                problems.append(f"{file}:{','.join(f'{lo}-{hi}' for lo, hi in ranges)} names `{name}`, "
                                f"which is not there (defined at {where or 'no line'})")
    assert checked > 100, f"only {checked} named citations parsed: the parser no longer reads the document"
    assert not problems, "docs/fidelity.md citations that drifted:\n" + "\n".join(problems)
