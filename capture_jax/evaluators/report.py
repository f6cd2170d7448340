"""The retrieval evaluation's HTML: one `report.html` per split and feature kind, one `index.html`.

Both are self-contained (thumbnails inlined as data URIs) so they can be copied anywhere. Scores
are shown in percent; the `metric_results.json` files beside them hold the official fractions.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

from capture_jax import metrics

_THUMB = 128  # Longest side of the report's thumbnails, in pixels.
_NAMES = ("mAP", "Prec", "mAR")
_CSS = """body{font-family:sans-serif;margin:16px;color:#222}table.s{border-collapse:collapse}
table.s td,table.s th{border:1px solid #bbb;padding:3px 10px;text-align:right}
table.s td.k,table.s th.k{text-align:left}tr.best td{font-weight:bold;background:#eaf6ea}
tr.base td{color:#555;font-style:italic}
.q{display:flex;gap:12px;border-top:2px solid #888;padding:10px 0}
.query{width:170px;flex:none;background:#eef3fb;padding:6px}
.hits{display:grid;grid-template-columns:repeat(5,150px);gap:8px}
.g{border:3px solid;padding:4px;font-size:12px}.hit{border-color:#1a8f2e}.miss{border-color:#c62828}
.mark{font-weight:bold;font-size:16px}.hit .mark{color:#1a8f2e}.miss .mark{color:#c62828}
img{width:128px;height:128px;object-fit:contain;background:#ddd;display:block}
.t{max-height:3.6em;overflow:hidden}.l{color:#555}.note{color:#444;max-width:60em}"""


def read_items(builder, split: str, wanted: set[str]) -> dict[str, tuple[str, str]]:
    """{id: (title, thumbnail data URI)} for the `wanted` ids of `split`, read from TFDS.

    The URI is "" (the report draws a placeholder) when the dataset stores no images (the
    region-feature configs) or an image does not decode.
    """
    import tensorflow_datasets as tfds
    from PIL import Image

    has_images = "image" in builder.info.features
    ds = builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()} if has_images else None,
        read_config=tfds.ReadConfig(try_autocache=False))
    items = {}
    for ex in tfds.as_numpy(ds):
        item_id = ex["id"].decode()
        if item_id not in wanted:
            continue
        uri = ""
        if has_images:
            try:
                image = Image.open(io.BytesIO(ex["image"])).convert("RGB")
                image.thumbnail((_THUMB, _THUMB))
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=85)
                uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            except Exception as e:  # A bad image must not stop the evaluation.
                logging.warning("report: cannot decode the image of %s: %s", item_id, e)
        items[item_id] = (ex["title"].decode(), uri)
    return items


def _head(title: str) -> str:
    e = html.escape
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<style>{_CSS}</style></head><body><h1>{e(title)}</h1>')


def _score_cells(scores: metrics.Scores) -> str:
    return "".join(f"<td>{100 * s[m]:.2f}</td>" for s in scores.values() for m in _NAMES)


def write_report(path: str, title: str, scores: metrics.Scores, queries: Sequence[tuple],
                 gallery_labels: Mapping[str, str], items: Mapping[str, tuple[str, str]],
                 chosen: str = "") -> None:
    """Self-contained HTML: the scores, then per shown query its top 10 (hit or miss).

    `queries` holds (id, labels, ranked ids, AP@10, number of gallery positives) per shown
    query; `chosen` says how they were picked.
    """
    e = html.escape
    img = lambda uri: f'<img src="{uri}" alt="">' if uri else '<img alt="no image">'
    out = [_head(title), '<table class="s"><tr><th></th>'
           + "".join(f"<th>{m}</th>" for m in _NAMES) + "</tr>"]
    out += [f"<tr><th>@{n[3:]}</th>" + "".join(f"<td>{100 * s[m]:.2f}</td>" for m in _NAMES)
            + "</tr>" for n, s in scores.items()]
    out.append("</table><p class=note>Scores in percent (metric_results.json beside this file "
               "holds the official fractions). Green ✓: the item's label is one of the query's "
               f"labels; red ✗: not. {e(chosen)}</p>")
    for qid, labels, ranked, ap10, positives in queries:
        q_title, q_uri = items.get(qid, ("", ""))
        hits = sum(gallery_labels.get(g) in labels for g in ranked[:10])
        out.append(f'<div class="q"><div class="query">{img(q_uri)}<b>query {e(qid)}</b>'
                   f'<div class="t">{e(q_title) or "(no title)"}</div><div class="l">labels: '
                   f'{e(" | ".join(labels))}</div><b>{hits}/10 hits</b><div>AP@10 '
                   f'{100 * ap10:.1f}</div><div>{positives} gallery positives</div></div>'
                   '<div class="hits">')
        for rank, gid in enumerate(ranked[:10], 1):
            label = gallery_labels.get(gid)
            hit, (g_title, g_uri) = label in labels, items.get(gid, ("", ""))
            out.append(f'<div class="g {"hit" if hit else "miss"}">{img(g_uri)}'
                       f'<span class="mark">{"✓" if hit else "✗"}</span> #{rank} {e(gid)}'
                       f'<div class="t">{e(g_title)}</div>'
                       f'<div class="l">{e(label or "(no label)")}</div></div>')
        out.append("</div></div>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(out) + "</body></html>\n")


def write_index(path: str, title: str, results: Mapping[str, metrics.Scores],
                descriptions: Mapping[str, str], headline: str, baselines: Sequence[str],
                run_info: Mapping[str, object], notes: Sequence[str] = (),
                usual: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """`index.html`: split x feature kind x score (baselines included), each row linking its
    report; the headline kind and the best row of each split marked; then the run's facts.
    `usual` ({split/kind: {"top10": fraction, ...}}, `metrics.usual_map`) adds the usual mAP@N
    columns after the official ones."""
    e = html.escape
    splits = list(dict.fromkeys(key.split("/")[0] for key in results))
    first = next(iter(results.values()))
    out = [_head(title), "<p class=note>Scores in percent. <b>Bold</b>: the best mAP@10 of the "
           f"split. Headline feature kind: <b>{e(headline)}</b>. Italic rows are untrained "
           "baselines scored on the same queries and gallery."
           + (" <b>usual mAP</b>: AP@N divided by min(N, positives), the scale of VIMER-UMS's "
              "numbers; not an official score (the official AP@N divides by the hits found)."
              if usual else "") + "</p>"]
    for split in splits:
        rows = {key.split("/", 1)[1]: s for key, s in results.items() if key.startswith(split + "/")}
        best = max(rows, key=lambda k: rows[k]["top10"]["mAP"])
        out.append(f'<h2>{e(split)} queries</h2><table class="s"><tr><th class=k rowspan=2>'
                   'feature kind</th>' + "".join(f"<th colspan=3>@{n[3:]}</th>" for n in first)
                   + (f"<th colspan={len(first)}>usual mAP (not official)</th>" if usual else "")
                   + "<th class=k rowspan=2>what it is</th></tr><tr>"
                   + "".join(f"<th>{m}</th>" for _ in first for m in _NAMES)
                   + ("".join(f"<th>@{n[3:]}</th>" for n in first) if usual else "") + "</tr>")
        for kind, s in rows.items():
            cls = " ".join(c for c, on in (("best", kind == best), ("base", kind in baselines))
                           if on)
            name = f"{kind} (headline)" if kind == headline else kind
            out.append(f'<tr class="{cls}"><td class=k><a href="{e(split)}/{e(kind)}/report.html">'
                       f"{e(name)}</a></td>{_score_cells(s)}"
                       + ("".join(f"<td>{100 * v:.2f}</td>" for v in usual[f"{split}/{kind}"]
                                  .values()) if usual else "") +
                       f"<td class=k>{e(descriptions.get(kind, ''))}</td></tr>")
        out.append("</table>")
    if notes:
        out.append("<h2>Ground truth</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes)
                   + "</ul>")
    def cell(v):
        if isinstance(v, dict):  # The config: folded, one field a line.
            return (f"<details><summary>{len(v)} fields</summary><pre>"
                    f"{e(json.dumps(v, indent=1, ensure_ascii=False))}</pre></details>")
        return e(v if isinstance(v, str) else json.dumps(v))
    out.append('<h2>Run</h2><table class="s">' + "".join(
        f"<tr><th class=k>{e(k)}</th><td class=k>{cell(v)}</td></tr>"
        for k, v in run_info.items()) + "</table>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(out) + "</body></html>\n")


def sample_queries(num_queries: int, count: int) -> tuple[np.ndarray, str]:
    """Indices of the queries a report shows, and one sentence saying how they were chosen."""
    picked = (np.unique(np.linspace(0, num_queries - 1, count).astype(int))
              if count > 0 and num_queries > 0 else [])
    return np.asarray(picked, int), (f"Shown: {len(picked)} of the {num_queries} queries, evenly "
                                     "spaced in file order (the same queries in every report).")
