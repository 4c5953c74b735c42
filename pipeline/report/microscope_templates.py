"""The model browser's jinja2 templates (rendered with autoescaping by :mod:`pipeline.report.microscope`).

Plain HTML and inline CSS: no scripts, nothing fetched from elsewhere. Every picture URL is a
generated relative path (``files/<group>/<hash>.png``), prefixed with ``up`` on pages one folder down.
"""

from __future__ import annotations

EXTRA_CSS = """
.crumbs a{margin-right:6px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(148px,1fr));gap:8px;margin-top:10px}
.tile{display:block;border:1px solid var(--line);border-radius:6px;padding:5px;font-size:12px;color:inherit;
  text-decoration:none;content-visibility:auto;contain-intrinsic-size:148px 120px}
.tile:hover{border-color:#0b5cad}
.tile .pics{display:flex;gap:3px}
.tile img,.tile .nopic{width:66px;height:66px;object-fit:contain;image-rendering:pixelated;background:#000;
  border:1px solid var(--line)}
.nopic{display:inline-flex;align-items:center;justify-content:center;text-align:center;font-size:10px;
  color:var(--muted);background:var(--soft)!important;border:1px dashed var(--line)!important}
.tile .name{font-weight:600}
.tile .lab{overflow-wrap:anywhere}
.tile .lab.none,.tile .lab.under{color:var(--muted)}
.big img,.big .nopic{width:192px;height:192px}
.pair{display:flex;gap:2px}
figure.pairfig{max-width:none}
.pair img,.pair .nopic{width:96px;height:96px}
"""

LAYOUT = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'">
<title>{% block title %}{% endblock %} · {{ title }}</title>
<style>{{ css | safe }}{{ extra_css | safe }}</style></head><body>
<header><h1>{% block heading %}{% endblock %}</h1><p>{{ title }}</p></header>
<nav class="crumbs">{% block crumbs %}{% endblock %}</nav>
<main>{% block main %}{% endblock %}</main></body></html>
"""

MACROS = """
{% macro picture(src, alt, size=none, missing="none") -%}
{% if src %}<img src="{{ up }}{{ src }}" alt="{{ alt }}" loading="lazy" decoding="async"
{%- if size %} width="{{ size }}" height="{{ size }}"{% endif %}>
{%- else %}<span class="nopic">{{ missing }}</span>{% endif %}
{%- endmacro %}
{% macro label(d, dissected) -%}
{% if not dissected %}<span class="lab none">not dissected</span>
{%- elif d is none %}<span class="lab none">no dissection row</span>
{%- elif d.label is present %}<span class="lab">{{ d.label }}</span> <span class="num">({{ d.iou | fmt }})</span>
{%- elif d.concept is present %}<span class="lab under">unlabelled (best: {{ d.concept }}, {{ d.iou | fmt }})</span>
{%- else %}<span class="lab none">unlabelled</span>{% endif %}
{%- endmacro %}
"""

INDEX = """{% extends "layout.html" %}{% import "macros.html" as m with context %}
{% block title %}Model browser{% endblock %}
{% block heading %}Model browser: every unit of every layer{% endblock %}
{% block crumbs %}{% if report %}<a href="{{ report }}">report</a>{% endif %}<a href="index.html">layers</a>{% endblock %}
{% block main %}
<section><h2>Layers</h2>
{% if layers %}
<table><thead><tr><th>layer</th><th>units</th><th>map size</th><th>labelled units</th><th>unique concepts</th>
<th>units with a feature visualisation</th></tr></thead><tbody>
{% for l in layers %}<tr><td><a href="{{ l.slug }}/index.html">{{ l.name }}</a></td><td class="num">{{ l.units }}</td>
<td class="num">{{ l.hw[0] }}×{{ l.hw[1] }}</td>
<td class="num">{% if l.dissected %}{{ l.labelled | fmt }}{% else %}not dissected{% endif %}</td>
<td class="num">{% if l.dissected %}{{ l.unique | fmt }}{% else %}–{% endif %}</td>
<td class="num">{{ l.pictured }}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p class="note">The activation store has no layer to show.</p>{% endif %}
{% if not dissected %}<p class="note">No layer is dissected, so units carry no concept labels yet: run
<code>{{ dissect_command }}</code> to label each unit with the concept its activations overlap most.</p>{% endif %}
<p class="note">Each layer page shows every unit as a tile: its concept label, the receptive-field crop of
its strongest dataset image and its gradient-ascent picture; a unit's page adds its top images, projections,
concept IoUs and class selectivity.</p>
</section>
{% endblock %}
"""

LAYER = """{% extends "layout.html" %}{% import "macros.html" as m with context %}
{% block title %}{{ layer }}{% endblock %}
{% block heading %}Layer {{ layer }}{% endblock %}
{% block crumbs %}{% if report %}<a href="{{ up }}{{ report }}">report</a>{% endif %}<a href="../index.html">layers</a>
<b>{{ layer }}</b>{% endblock %}
{% block main %}
<section><h2>{{ units | length }} units</h2>
<dl class="facts"><dt>units</dt><dd>{{ units | length }}</dd><dt>map size</dt><dd>{{ hw[0] }}×{{ hw[1] }}</dd>
{% if dissected %}<dt>labelled units</dt><dd>{{ summary.labelled | fmt }}</dd>
<dt>unique concepts</dt><dd>{{ summary.unique_detectors | fmt }}</dd>
<dt>IoU cut</dt><dd>{{ summary.cut | fmt }}</dd><dt>activation quantile</dt><dd>{{ summary.quantile | fmt }}</dd>
<dt>images dissected</dt><dd>{{ summary.images | fmt }}</dd>{% endif %}</dl>
{% if not dissected %}<p class="note">This layer is not dissected: run <code>{{ dissect_command }}</code>
to give its units concept labels.</p>{% endif %}
{% if picture_note %}<p class="note">{{ picture_note }}</p>{% endif %}
{% if detectors %}<details><summary>Concept detectors ({{ detectors | length }} concepts)</summary>
<table><thead><tr><th>concept</th><th>units</th></tr></thead><tbody>
{% for concept, members in detectors %}<tr><td>{{ concept }}</td>
<td>{% for k in members %}<a href="unit-{{ k }}.html">{{ k }}</a> {% endfor %}</td></tr>
{% endfor %}</tbody></table></details>{% endif %}
<div class="tiles">
{% for u in units %}<a class="tile" href="unit-{{ u.index }}.html"><div class="name">unit {{ u.index }}</div>
<div class="pics">{{ m.picture(u.crop, "top crop", 66, "no top image") }}
{{ m.picture(u.ascent, "feature visualisation", 66, "no picture yet") }}</div>
<div>{{ m.label(u.dissect, dissected) }}</div></a>
{% endfor %}</div>
</section>
{% endblock %}
"""

UNIT = """{% extends "layout.html" %}{% import "macros.html" as m with context %}
{% block title %}{{ layer }} unit {{ unit.index }}{% endblock %}
{% block heading %}{{ layer }} · unit {{ unit.index }}{% endblock %}
{% block crumbs %}{% if report %}<a href="{{ up }}{{ report }}">report</a>{% endif %}<a href="../index.html">layers</a>
<a href="index.html">{{ layer }}</a>
{% if prev is not none %}<a href="unit-{{ prev }}.html">← unit {{ prev }}</a>{% endif %}
{% if next is not none %}<a href="unit-{{ next }}.html">unit {{ next }} →</a>{% endif %}{% endblock %}
{% block main %}
<section><h2>Label</h2>
<dl class="facts"><dt>concept label</dt><dd>{{ m.label(unit.dissect, dissected) }}</dd>
{% if unit.dissect %}<dt>best concept</dt><dd>{{ unit.dissect.concept | fmt }}</dd>
<dt>IoU</dt><dd>{{ unit.dissect.iou | fmt }}</dd><dt>purity</dt><dd>{{ unit.dissect.purity | fmt }}</dd>{% endif %}
<dt>mean top-{{ unit.top | length }} activation</dt><dd>{{ unit.mean | fmt }}</dd></dl>
{% if not dissected %}<p class="note">Not dissected: run <code>{{ dissect_command }}</code> for concept labels.</p>{% endif %}
</section>
<section><h2>Top {{ unit.top | length }} dataset images</h2>
<p class="note">By the unit's spatial maximum; below each image, its receptive-field crop around the strongest position.</p>
<div class="row">{% for t in unit.top %}<figure>{{ m.picture(t.image, t.name) }}{{ m.picture(t.crop, "crop") }}
<figcaption>#{{ loop.index }} {{ t.value | fmt(2) }}{% if t.label %} · {{ t.label }}{% endif %}</figcaption></figure>
{% else %}<p class="note">No top image is on disk.</p>{% endfor %}</div>
</section>
<section><h2>Feature visualisation</h2>
<div class="row big"><figure>{{ m.picture(unit.ascent, "gradient ascent", none, "no picture yet") }}
<figcaption>gradient ascent</figcaption></figure></div>
{% if not unit.ascent and picture_note %}<p class="note">{{ picture_note }}</p>{% endif %}
</section>
<section><h2>Projections</h2>
{% if projection_note %}<p class="note">{{ projection_note }}</p>{% endif %}
{% for title, pairs in unit.projections.items() %}<h3>{{ title }} | image patch</h3>
<div class="row">{% for p, q in pairs %}<figure class="pairfig">
<span class="pair">{{ m.picture(p, title) }}{{ m.picture(q, "patch") }}</span>
<figcaption>#{{ loop.index }}</figcaption></figure>{% endfor %}</div>
{% else %}<p class="note">No projection of this unit yet.</p>{% endfor %}
</section>
<section><h2>Concepts</h2>
{% if unit.concepts %}<table><thead><tr><th>rank</th><th>concept</th><th>IoU</th></tr></thead><tbody>
{% for c in unit.concepts %}<tr><td class="num">{{ c.rank }}</td><td>{{ c.concept }}</td>
<td class="num">{{ c.iou | fmt }}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p class="note">{% if dissected %}No concept IoUs for this unit.{% else %}Not dissected.{% endif %}</p>{% endif %}
</section>
<section><h2>Class selectivity</h2>
{% if unit.dissect and unit.dissect.top_class is present %}<dl class="facts">
<dt>top class</dt><dd>{{ unit.dissect.top_class }}</dd>
<dt>selectivity</dt><dd>{{ unit.dissect.selectivity | fmt }}</dd></dl>{% endif %}
{% if unit.classes %}<h3>Classes among the top {{ unit.top | length }} images</h3>
<table><thead><tr><th>class</th><th>images</th></tr></thead><tbody>
{% for name, n in unit.classes %}<tr><td>{{ name }}</td><td class="num">{{ n }}</td></tr>{% endfor %}
</tbody></table>{% else %}<p class="note">The top images carry no class labels.</p>{% endif %}
</section>
{% endblock %}
"""

TEMPLATES = {"layout.html": LAYOUT, "macros.html": MACROS,
             "index.html": INDEX, "layer.html": LAYER, "unit.html": UNIT}
