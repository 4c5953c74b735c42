"""Small HTML building blocks and the page shell. Every value is escaped unless it is :class:`Raw`.

The page is plain HTML with inline CSS: no scripts, fonts or anything else fetched from elsewhere,
so it opens offline and from any folder it is copied to (with its ``_files`` folder).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd


class Raw(str):
    """A string of trusted HTML, inserted as it is."""


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML content and quoted attributes; Raw passes through."""
    if isinstance(value, Raw):
        return value
    return html.escape("" if value is None else str(value), quote=True)


def url(relative: str) -> str:
    """A relative URL made of generated path parts, percent-encoded and escaped for an attribute."""
    return esc(quote(relative, safe="/._-"))


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: floats with ``digits`` decimals, NaN/NA/None as a dash, booleans as yes/no."""
    if value is None or value is pd.NA:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{float(value):.{digits}f}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def img(src: str | None, alt: str, title: str | None = None, cls: str = "", lazy: bool = True) -> Raw:
    """An ``<img>`` of a relative URL, or a small 'missing' box when there is no file."""
    if src is None:
        return Raw(f'<span class="missing" title="{esc(title or alt)}">missing</span>')
    extra = f' title="{esc(title)}"' if title else ""
    loading = ' loading="lazy"' if lazy else ""
    klass = f' class="{esc(cls)}"' if cls else ""
    return Raw(f'<img src="{url(src)}" alt="{esc(alt)}"{extra}{klass}{loading} decoding="async">')


def link(href: str | None, text: Any) -> Raw:
    """A link to a relative URL (plain text when there is none)."""
    if href is None:
        return Raw(esc(text))
    return Raw(f'<a href="{url(href)}">{esc(text)}</a>')


def figure(picture: Raw, caption: Any = "", cls: str = "") -> Raw:
    """A picture with a caption underneath (``caption`` may be Raw)."""
    klass = f' class="{esc(cls)}"' if cls else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption != "" else ""
    return Raw(f"<figure{klass}>{picture}{cap}</figure>")


def note(text: Any) -> Raw:
    """A short grey note (why a section is empty, what a table means)."""
    return Raw(f'<p class="note">{esc(text)}</p>')


def badge(ok: bool | None, yes: str = "pass", no: str = "FAIL", na: str = "n/a") -> Raw:
    """A coloured pass / fail / not-applicable label."""
    if ok is None:
        return Raw(f'<span class="badge na">{esc(na)}</span>')
    return Raw(f'<span class="badge {"ok" if ok else "bad"}">{esc(yes if ok else no)}</span>')


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "", digits: int = 3) -> Raw:
    """A table; cells are formatted with :func:`fmt` and escaped unless Raw. Numeric cells align right."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, Raw):
                cells.append(f"<td>{v}</td>")
            else:
                numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
                cells.append(f'<td class="num">{esc(fmt(v, digits))}</td>' if numeric else f"<td>{esc(fmt(v, digits))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    klass = f' class="{esc(cls)}"' if cls else ""
    return Raw(f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def facts(items: Mapping[str, Any]) -> Raw:
    """A two-column key/value list."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd>" for k, v in items.items())
    return Raw(f'<dl class="facts">{rows}</dl>')


def sparkline(values: Sequence[float], labels: Sequence[str], width: int = 220, height: int = 48,
              low: float = -1.0, high: float = 1.0, threshold: float | None = None) -> Raw:
    """An inline SVG line of ``values`` (NaN skipped) on a fixed [low, high] scale, with an optional
    dashed threshold line; each point's title is its label and value."""
    n = len(values)
    if n == 0:
        return Raw("")
    pad = 4

    def xy(i: int, v: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * (i / (n - 1) if n > 1 else 0.5)
        y = pad + (height - 2 * pad) * (high - min(max(v, low), high)) / (high - low)
        return round(x, 1), round(y, 1)

    points = [(i, v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    path = " ".join(f"{x},{y}" for x, y in (xy(i, v) for i, v in points))
    parts = [f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="Spearman per step">',
             f'<line x1="{pad}" x2="{width - pad}" y1="{xy(0, 0.0)[1]}" y2="{xy(0, 0.0)[1]}" class="axis"/>']
    if threshold is not None:
        ty = xy(0, threshold)[1]
        parts.append(f'<line x1="{pad}" x2="{width - pad}" y1="{ty}" y2="{ty}" class="thr"/>')
    if path:
        parts.append(f'<polyline points="{path}" class="line"/>')
    for i, v in points:
        x, y = xy(i, v)
        parts.append(f'<circle cx="{x}" cy="{y}" r="2.5"><title>{esc(labels[i])}: {v:.3f}</title></circle>')
    parts.append("</svg>")
    return Raw("".join(parts))


@dataclass
class Section:
    """One part of the page: an anchor id (generated, not user text), a heading and its HTML."""

    id: str
    title: str
    body: Raw


CSS = """
:root{--fg:#1d2228;--muted:#5d6670;--line:#d9dee3;--bg:#fff;--soft:#f4f6f8;--ok:#1a7f37;--bad:#cf222e}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:18px 28px;border-bottom:1px solid var(--line);background:var(--soft)}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:var(--muted)}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:8px 28px}
nav a{margin-right:16px;color:#0b5cad;text-decoration:none}
main{padding:8px 28px 40px}
section{margin:22px 0 30px}
h2{font-size:18px;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{font-size:15px;margin:18px 0 8px}
h4{font-size:13px;margin:10px 0 6px;color:var(--muted)}
a{color:#0b5cad}
.note{color:var(--muted);font-style:italic}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:var(--soft)}
td.num{text-align:right;font-variant-numeric:tabular-nums}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:8px 0}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:12px;max-width:150px}
figure img{display:block;width:128px;height:128px;object-fit:contain;image-rendering:pixelated;border:1px solid var(--line);background:#000}
figure.small img{width:72px;height:72px}
figure.wide{max-width:none}
figure.wide img{width:auto;height:auto;max-width:100%;image-rendering:auto;background:#fff}
figcaption{color:var(--muted);overflow-wrap:anywhere}
.neuron{border:1px solid var(--line);border-radius:6px;padding:8px 10px;margin:10px 0}
.neuron .label{font-weight:600;margin-bottom:4px}
.explained{border-top:1px solid var(--line);padding:10px 0}
.explained .meta{margin-bottom:6px}
.explained .meta b{margin-right:10px}
.links{font-size:11px}
.links a{margin:0 2px}
.missing{display:inline-block;width:72px;height:72px;line-height:72px;text-align:center;border:1px dashed var(--bad);color:var(--bad);font-size:11px}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;font-weight:600}
.badge.ok{background:#dafbe1;color:var(--ok)}
.badge.bad{background:#ffebe9;color:var(--bad)}
.badge.na{background:var(--soft);color:var(--muted)}
svg.spark .line{fill:none;stroke:#0b5cad;stroke-width:1.5}
svg.spark circle{fill:#0b5cad}
svg.spark .axis{stroke:#bbb;stroke-width:1}
svg.spark .thr{stroke:var(--bad);stroke-width:1;stroke-dasharray:3 3}
.scroll{overflow-x:auto}
"""


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document: header, a navigation bar of section links, the sections."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")
