"""The report page as blocks, rendered both as markdown (``results/report.md``, figures linked by relative path) and
as one self-contained HTML page (``results/report.html``, figures embedded as base64 PNG, the PDF beside each
linked). Collapsible ``<details>`` sections hold what a reader opens on demand (definitions, the long prose,
provenance); both renderings keep them (GitHub's markdown shows ``<details>`` collapsed too)."""
from __future__ import annotations

import base64
import html
import os
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from workflow.lib.display import markdown

STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;line-height:1.4}"
         "h1{margin:0.2em 0}h2{margin:1em 0 0.3em}"
         "table.t{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
         "table.t td,table.t th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
         "table.verdicts{font-size:0.9em}table.verdicts td.keep{white-space:nowrap}"
         "table.verdicts td.status{font-weight:bold}"
         "tr.shown td.status{background:#d7f0d7}tr.not-shown td.status{background:#eee}"
         "tr.not-estimable td.status{background:#fbe9c6}tr.inert td.status{background:#f6d2d2}"
         "img{max-width:100%}figure{margin:0.5em 0}pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.8em}"
         ".caption{font-style:italic;margin-bottom:0}.lead{margin:0.3em 0}"
         "details{margin:0.6em 0}summary{cursor:pointer;font-weight:bold}")


def anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


class Document:
    """Blocks rendered both as markdown and as one self-contained HTML page."""

    def __init__(self, title: str, root: Path):
        self.title, self.root, self.blocks = title, root, []

    def heading(self, text: str):
        self.blocks.append(("h2", text))

    def text(self, text: str):
        self.blocks.append(("p", text))

    def table(self, frame: pd.DataFrame, caption: str = ""):
        self.blocks.append(("table", frame, caption))

    def verdicts(self, frame: pd.DataFrame):
        """The verdict panel: a table whose rows carry their status as a class (colour beside the word)."""
        self.blocks.append(("verdicts", frame))

    def code(self, text: str):
        self.blocks.append(("pre", text))

    def figure(self, path: str, caption: str):
        self.blocks.append(("figure", Path(path), caption))

    @contextmanager
    def details(self, summary: str, open_: bool = False):
        """The blocks added inside the ``with`` go into a collapsible section."""
        self.blocks.append(("details", summary, open_))
        yield
        self.blocks.append(("/details",))

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root)

    # ------------------------------------------------------------------------------------------ markdown
    def markdown(self) -> str:
        out = [f"# {self.title}\n"]
        for block in self.blocks:
            out.append(self._markdown_block(*block))
        return "\n".join(out)

    def _markdown_block(self, kind, *args) -> str:
        if kind == "h2":
            return f"## {args[0]}\n"
        if kind == "p":
            return args[0] + "\n"
        if kind in ("table", "verdicts"):
            frame, caption = args[0], (args[1] if len(args) > 1 else "")
            return (f"{caption}\n\n" if caption else "") + markdown(frame.astype(object).where(frame.notna(), ""))
        if kind == "pre":
            return f"```\n{args[0].rstrip()}\n```\n"
        if kind == "figure":
            path, caption = args
            pdf = path.with_suffix(".pdf")
            return (f"![{caption}]({self.rel(path)})\n\n*{caption}*"
                    + (f" ([PDF]({self.rel(pdf)}))" if pdf.exists() else "") + "\n")
        if kind == "details":
            return f"<details{' open' if args[1] else ''}><summary>{html.escape(args[0])}</summary>\n"
        if kind == "/details":
            return "</details>\n"
        raise ValueError(f"unknown block {kind!r}")

    # ---------------------------------------------------------------------------------------------- HTML
    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"] + [self._html_block(*block) for block in self.blocks]
        return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(self.title)}"
                f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

    def _html_block(self, kind, *args) -> str:
        if kind == "h2":
            return f'<h2 id="{anchor(args[0])}">{html.escape(args[0])}</h2>'
        if kind == "p":
            return f"<p>{html.escape(args[0])}</p>"
        if kind == "table":
            frame, caption = args
            caption = f"<p class='caption'>{html.escape(caption)}</p>" if caption else ""
            return caption + frame.to_html(index=False, na_rep="", border=0, classes="t")
        if kind == "verdicts":
            return self._verdict_html(args[0])
        if kind == "pre":
            return f"<pre>{html.escape(args[0])}</pre>"
        if kind == "figure":
            path, caption = args
            data = base64.b64encode(path.read_bytes()).decode()
            pdf = path.with_suffix(".pdf")
            link = f' (<a href="{html.escape(self.rel(pdf))}">PDF</a>)' if pdf.exists() else ""
            return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}{link}</figcaption></figure>")
        if kind == "details":
            return f"<details{' open' if args[1] else ''}><summary>{html.escape(args[0])}</summary>"
        if kind == "/details":
            return "</details>"
        raise ValueError(f"unknown block {kind!r}")

    @staticmethod
    def _verdict_html(frame: pd.DataFrame) -> str:
        """Each row's class is its status (the ``status`` column), so the status cell is coloured beside its word."""
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        column = list(frame.columns).index("status")
        # one line per verdict: only the question and the reason wrap
        kinds = ["keep status" if c == "status" else "" if c in ("question", "why") else "keep" for c in frame.columns]
        rows = []
        for values in frame.itertuples(index=False):
            cells = "".join((f'<td class="{k}">' if k else "<td>") + f"{html.escape(str(v))}</td>"
                            for k, v in zip(kinds, values))
            rows.append(f'<tr class="{anchor(str(values[column]))}">{cells}</tr>')
        return (f'<table class="t verdicts"><thead><tr>{head}</tr></thead><tbody>' + "".join(rows)
                + "</tbody></table>")
