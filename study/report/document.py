"""The report as a document: a list of blocks (headings, paragraphs, warnings, tables, figures)
rendered twice, to Markdown (figures linked from figures/) and to one self-contained HTML page
(figures embedded as data URIs, so it opens offline and can be mailed). Every text that can come
from the user's data (file names, class names, error messages) is escaped here, never by the
callers.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import re

import numpy as np
import pandas as pd


@dataclasses.dataclass
class Document:
    """Blocks rendered to both Markdown and HTML; figures kept as PNG bytes under a file-safe
    name."""

    title: str
    blocks: list[tuple] = dataclasses.field(default_factory=list)
    figures: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def warn(self, text: str) -> None:
        self.blocks.append(("warn", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def figure(self, name: str, png: bytes, caption: str) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.figures[name] = png
        self.blocks.append(("figure", name, caption))

    def markdown(self) -> str:
        out = [f"# {_md(self.title)}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += ["#" * block[1] + " " + _md(block[2]), ""]
            elif kind == "para":
                out += [_md(block[1]), ""]
            elif kind == "warn":
                out += [f"> **Warning:** {_md(block[1])}", ""]
            elif kind == "table":
                frame = block[1]
                out.append("| " + " | ".join(_md(c) for c in frame.columns) + " |")
                out.append("|" + "---|" * len(frame.columns))
                out += [
                    "| " + " | ".join(_md(format_cell(v)) for v in row) + " |"
                    for row in frame.itertuples(index=False)
                ]
                out.append("")
            elif kind == "figure":
                out += [f"![{_md(block[2])}](figures/{block[1]}.png)", "", f"*{_md(block[2])}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        esc = html.escape
        parts = []
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                level = min(block[1], 4)
                parts.append(f"<h{level}>{esc(block[2])}</h{level}>")
            elif kind == "para":
                parts.append(f"<p>{esc(block[1])}</p>")
            elif kind == "warn":
                parts.append(f'<p class="warn">&#9888; {esc(block[1])}</p>')
            elif kind == "table":
                frame = block[1]
                head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
                rows = "".join(
                    "<tr>" + "".join(f"<td>{esc(format_cell(v))}</td>" for v in row) + "</tr>"
                    for row in frame.itertuples(index=False)
                )
                parts.append(
                    f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                    f"<tbody>{rows}</tbody></table></div>"
                )
            elif kind == "figure":
                data = base64.b64encode(self.figures[block[1]]).decode("ascii")
                parts.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block[2])}">'
                    f"<figcaption>{esc(block[2])}</figcaption></figure>"
                )
        return _HTML_PAGE.format(title=esc(self.title), body="\n".join(parts))


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; \
padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }}
th {{ background: #f2f2f2; }}
td, th {{ overflow-wrap: break-word; }}
.scroll {{ overflow-x: auto; }}
.warn {{ background: #fff4e0; border-left: 4px solid #e69500; padding: 0.4em 0.8em; }}
figure {{ margin: 0.5em 0 1.5em; }}
img {{ max-width: 100%; }}
figcaption {{ font-size: 0.85em; color: #555; }}
h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }}
</style></head>
<body>
<h1>{title}</h1>
{body}
</body></html>
"""


def _md(text) -> str:
    """Markdown-safe: HTML-escaped (viewers render raw HTML) and no table-breaking pipes or
    newlines."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def format_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return format_number(value)
    return str(value)


def format_number(value: float) -> str:
    value = float(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3g}"
    return f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"


def format_interval(metric: dict) -> str:
    lo, hi = metric["ci95"]
    return f"{metric['value']:.3f} [{lo:.3f}, {hi:.3f}]"
