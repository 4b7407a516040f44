"""The review as files: ``review.json`` and an offline HTML page (``index.html``, everything inline).

The page shows each finding as a thumbnail large enough to judge (photos at up to 224 pixels,
CIFAR-10's 32x32 images enlarged 5x), ``given -> suggested``, the score, the kind and the path,
with filters by class and by kind. Served by :mod:`imclass.review.app` it also has Accept / Reject
buttons whose decisions become the plan ``relabel.csv``.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from imclass.data.decode import decode_array

# Deferred imports (inside functions), for start-up time: PIL
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["PAGE_FILE", "REVIEW_FILE", "thumbnail", "write_review"]

PAGE_FILE = "index.html"
REVIEW_FILE = "review.json"
THUMB = 224  # longest side of a photo's thumbnail
SMALL_SCALE = 5  # small images (CIFAR-10, MNIST) are enlarged this many times (nearest neighbour)


def thumbnail(source: Path | torch.Tensor) -> str:
    """A ``data:`` URI (JPEG, or PNG for small images) of an image file or a uint8 (C, H, W) tensor."""
    from PIL import Image

    if isinstance(source, torch.Tensor):
        array = source.permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
        im = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        im = im.resize((im.width * SMALL_SCALE, im.height * SMALL_SCALE), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    array = decode_array(source, mode="RGB", resize=THUMB)  # the one decoding gate; shorter side 224
    im = Image.fromarray(array)
    im.thumbnail((THUMB, THUMB))  # longer side 224 too
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_review(result: Any, out: str | os.PathLike, *, config: dict[str, Any] | None = None,
                 max_shown: int = 500) -> tuple[Path, Path]:
    """Write ``review.json`` (every finding, each with an ``id``) and ``index.html`` (the first
    ``max_shown`` findings) into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    for n, issue in enumerate(data["issues"]):
        issue["id"] = n
    data["config"] = config or {}
    data["root"] = result.source if result.paths is not None else None
    review_path = out / REVIEW_FILE
    review_path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    shown = []
    for issue in data["issues"][:max_shown]:
        i = issue["row"]  # position among the reviewed images
        src = result.paths[i] if result.paths is not None else result.pixels[i]
        shown.append({**{k: issue[k] for k in ("id", "index", "path", "given", "suggested", "score", "kind")},
                      "img": thumbnail(src)})
    page_path = out / PAGE_FILE
    page_path.write_text(render_page(data, shown))
    return review_path, page_path


def render_page(data: dict[str, Any], shown: list[dict[str, Any]]) -> str:
    """The HTML of the page (no external resource: thumbnails are data URIs, script and style inline)."""
    title = f"Label review: {Path(str(data['source'])).name} ({data['split']})"
    summary = (f"{len(data['issues']):,} findings in {data['images']:,} images "
               f"({', '.join(f'{v} {k}' for k, v in data['counts'].items())}); "
               f"estimated label errors {data['estimated_label_errors']:,}; {data['method']}; "
               f"{data['seconds']:.1f} s" + (f"; showing the first {len(shown)}" if len(shown) < len(data["issues"]) else ""))
    payload = json.dumps({"classes": data["classes"], "items": shown, "fixable": data.get("root") is not None})
    payload = payload.replace("</", "<\\/")  # never close the script element from inside the data
    return _TEMPLATE.replace("%TITLE%", html.escape(title)).replace("%SUMMARY%", html.escape(summary)) \
        .replace("%DATA%", payload)


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } #summary { color: #555; margin-bottom: 12px; }
#bar { position: sticky; top: 0; background: #fafafa; padding: 8px 0; display: flex; gap: 16px; align-items: center; z-index: 1; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.card img { width: 224px; height: 224px; object-fit: contain; background: #eee; display: block; margin: 0 auto; image-rendering: auto; }
.card.small img { image-rendering: pixelated; }
.labels { font-weight: 600; margin-top: 6px; } .given { color: #b00; } .suggested { color: #070; }
.meta { color: #666; font-size: 12px; word-break: break-all; }
.kind { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; background: #eef; }
.kind.outlier { background: #fec; } .kind.duplicate { background: #eee0ff; }
.card[data-decision=accept] { border: 2px solid #2a2; } .card[data-decision=reject] { border: 2px solid #aaa; opacity: .6; }
button { margin-right: 6px; } .actions { margin-top: 6px; }
</style></head>
<body data-state="loading">
<h1>%TITLE%</h1>
<div id="summary">%SUMMARY%</div>
<div id="bar">
 <label>class <select id="class"><option value="">all</option></select></label>
 <label>kind <select id="kind"><option value="">all</option><option>label</option><option>outlier</option><option>duplicate</option></select></label>
 <span id="count"></span> <span id="plan"></span>
</div>
<div id="grid"></div>
<script id="data" type="application/json">%DATA%</script>
<script>
const DATA = JSON.parse(document.getElementById('data').textContent);
const API = document.body.dataset.api === '1' || window.location.protocol.startsWith('http') && window.REVIEW_API === true;
const grid = document.getElementById('grid'), byClass = document.getElementById('class'), byKind = document.getElementById('kind');
for (const c of DATA.classes) { const o = document.createElement('option'); o.value = o.textContent = c; byClass.appendChild(o); }
function card(it) {
  const d = document.createElement('div');
  d.className = 'card'; d.dataset.id = it.id; d.dataset.kind = it.kind; d.dataset.given = it.given;
  d.dataset.suggested = it.suggested || '';
  const img = document.createElement('img'); img.src = it.img; img.alt = it.path || ('#' + it.index); d.appendChild(img);
  const l = document.createElement('div'); l.className = 'labels';
  l.innerHTML = '<span class="given"></span> \\u2192 <span class="suggested"></span>';
  l.querySelector('.given').textContent = it.given; l.querySelector('.suggested').textContent = it.suggested || '(none)';
  d.appendChild(l);
  const m = document.createElement('div'); m.className = 'meta';
  m.innerHTML = '<span class="kind"></span> score <span class="score"></span><br><span class="path"></span>';
  m.querySelector('.kind').textContent = it.kind; m.querySelector('.kind').classList.add(it.kind);
  m.querySelector('.score').textContent = it.score.toFixed(3);
  m.querySelector('.path').textContent = it.path || ('index ' + it.index);
  d.appendChild(m);
  if (API && DATA.fixable && it.suggested) {
    const a = document.createElement('div'); a.className = 'actions';
    for (const [name, label] of [['accept', 'Accept'], ['reject', 'Reject']]) {
      const b = document.createElement('button'); b.className = name; b.textContent = label;
      b.onclick = () => decide(it.id, name, d); a.appendChild(b);
    }
    d.appendChild(a);
  }
  return d;
}
async function decide(id, decision, el) {
  const r = await fetch('api/decision', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                         body: JSON.stringify({id: id, decision: decision})});
  const body = await r.json();
  if (!r.ok) { document.getElementById('plan').textContent = 'error: ' + (body.detail || r.status); return; }
  el.dataset.decision = decision;
  document.getElementById('plan').textContent = body.accepted + ' accepted, ' + body.rejected + ' rejected \\u2192 ' + body.plan;
  document.body.dataset.saved = String(body.accepted + body.rejected);
}
function filter() {
  let n = 0;
  for (const el of grid.children) {
    const show = (!byClass.value || el.dataset.given === byClass.value || el.dataset.suggested === byClass.value)
              && (!byKind.value || el.dataset.kind === byKind.value);
    el.hidden = !show; n += show;
  }
  document.getElementById('count').textContent = n + ' shown';
}
for (const it of DATA.items) { const c = card(it); if (it.img.startsWith('data:image/png')) c.classList.add('small'); grid.appendChild(c); }
byClass.onchange = byKind.onchange = filter;
filter();
document.body.dataset.state = 'ready';
</script></body></html>
"""
