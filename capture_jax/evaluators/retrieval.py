"""Retrieval evaluation: embed gallery and queries, rank exactly in JAX, score, write, report.

For every query split (dev, test) and feature kind (joint, visual, text) it writes, under
`workdir/retrieval/<split>/<kind>/`: `retrieval_id_list.txt` (official format, `qid,g0,...,g99`),
`metric_results.json` (official scores, percent) and `report.html` (a sample of queries with their
top-10 gallery items, hit or miss, images embedded). Only process 0 writes; every process embeds
and ranks (collectives).

Ranking (`top_k`) is exact float32 dot-product top-k. The gallery is sharded by rows over all the
devices of the mesh; each device scores a chunk of queries against its rows tile by tile and keeps a
running top-k, then the per-device candidates are merged. Memory is bounded by query_chunk x
gallery_tile scores per device, whatever the gallery size. Within a tile, rows are grouped in
blocks of `_BLOCK`; the exact top-k lies in the k blocks with the largest maxima (every block
ranked above an element's block holds an element at least as large), so only those k blocks are
searched. Ties go to the lower gallery index, as in a stable numpy argsort of -scores: lax.top_k
prefers the lower position, and every concatenation (selected blocks in index order, running
list before the new tile, devices in row order) keeps positions in gallery-index order.
"""

import base64
import html
import io
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from capture_jax import input_pipeline, metrics, sharding

_BLOCK = 32  # Gallery rows per block of the block-maximum pruning (see the module docstring).
_THUMB = 128  # Longest side of the report's thumbnails, in pixels.


def eval_config() -> ml_collections.ConfigDict:
    """Defaults of `config.eval`."""
    return ml_collections.ConfigDict(dict(
        gallery_split="gallery",  # split ranked for every query (one label per item)
        query_splits=("dev", "test"),  # query splits; each gets its own files and scores
        feature_kinds=("joint", "visual", "text"),  # keys of CaptureModel.embed to rank with
        top_k=100,  # gallery ids written per query (the official scores use up to 100)
        query_chunk=1024,  # queries ranked at once; memory = query_chunk x gallery_tile floats
        gallery_tile=32768,  # gallery rows per device scored at once
        report_queries=20,  # queries shown in each report.html (evenly spaced sample)
    ))


# ------------------------------------------------------------------------------------ ranking
_RANKERS = {}


def _ranker(mesh, chunk: int, dim: int, k: int, num_valid: int, rows: int, tile: int):
    """Jitted (init, step, merge). Device d owns gallery rows [d * rows, (d + 1) * rows), fed as
    tiles of `tile` rows; `step(q, tile_rows, best_v, best_i, t)` folds tile t into each device's
    running top-k [devices, chunk, k]; `merge` gives the replicated top-k [chunk, k]."""
    key = (mesh, chunk, dim, k, num_valid, rows, tile)
    if key in _RANKERS:
        return _RANKERS[key]
    axes, n, nb = mesh.axis_names, mesh.size, tile // _BLOCK
    dims = (((1,), (1,)), ((), ()))

    def per_device(q, g, best_v, best_i, t):
        base = jax.lax.axis_index(axes) * rows + t * tile
        s = jax.lax.dot_general(q, g, dims, precision=jax.lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32)
        ids = base + jnp.arange(tile, dtype=jnp.int32)
        if nb > k:  # Prune: search only the k blocks with the largest maxima.
            masked = jnp.where(ids < num_valid, s, -jnp.inf).reshape(chunk, nb, _BLOCK)
            _, blocks = jax.lax.top_k(masked.max(-1), k)
            blocks = jnp.sort(blocks, axis=-1)  # Index order, for the tie rule.
            pos = (blocks[:, :, None] * _BLOCK + jnp.arange(_BLOCK)).reshape(chunk, -1)
            cand = jnp.take_along_axis(s, pos, axis=1)
            cand = jnp.where(base + pos < num_valid, cand, -jnp.inf)
        else:
            pos = jnp.broadcast_to(jnp.arange(tile, dtype=jnp.int32), s.shape)
            cand = jnp.where(ids < num_valid, s, -jnp.inf)
        v, p = jax.lax.top_k(cand, k)
        v = jnp.concatenate([best_v[0], v], 1)  # Earlier tiles (lower indices) first.
        i = jnp.concatenate([best_i[0], base + jnp.take_along_axis(pos, p, axis=1)], 1)
        v, p = jax.lax.top_k(v, k)
        return v[None], jnp.take_along_axis(i, p, axis=1)[None]

    def merge(v, i):
        v, i = (x.transpose(1, 0, 2).reshape(chunk, n * k) for x in (v, i))  # Device order.
        v, p = jax.lax.top_k(v, k)
        return v, jnp.take_along_axis(i, p, axis=1)

    sharded, replicated = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
    init = jax.jit(lambda: (jnp.full((n, chunk, k), -jnp.inf, jnp.float32),
                            jnp.full((n, chunk, k), -1, jnp.int32)),
                   out_shardings=(sharded, sharded))
    step = jax.jit(jax.shard_map(per_device, mesh=mesh, out_specs=(P(axes), P(axes)),
                                 in_specs=(P(), P(axes), P(axes), P(axes), P())),
                   donate_argnums=(2, 3))
    _RANKERS[key] = init, step, jax.jit(merge, out_shardings=(replicated, replicated))
    return _RANKERS[key]


def _put(array: np.ndarray, sharding, shape, source_row=lambda row: row) -> jax.Array:
    """Host rows -> global jax.Array of `shape`; global row r holds array[source_row(r)] (a
    contiguous run per shard), zeros past the array's end."""
    def shard(index):
        start, stop, _ = index[0].indices(shape[0])
        a, b = source_row(start), source_row(start) + stop - start
        if b <= len(array):
            return array[a:b]
        out = np.zeros((b - a, *shape[1:]), np.float32)
        out[:max(len(array) - a, 0)] = array[a:len(array)]
        return out
    return jax.make_array_from_callback(shape, sharding, shard)


def query_chunk_size(num_queries: int, query_chunk: int) -> int:
    """Queries per ranker call: balanced chunks of at most ~query_chunk, a multiple of 8."""
    return -(-num_queries // -(-num_queries // query_chunk) // 8) * 8


def top_k(queries, gallery, k: int, mesh, *, query_chunk: int = 1024,
          gallery_tile: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of queries @ gallery.T: (scores [Q, k'], gallery indices [Q, k']), best first.

    k' = min(k, G). Ties go to the lower gallery index. `queries` [Q, D] and `gallery` [G, D] are
    host arrays, the same on every process; the result is returned on every process.
    """
    queries = np.asarray(queries, np.float32)
    gallery = np.asarray(gallery, np.float32)
    (num_q, dim), num_g = queries.shape, gallery.shape[0]
    if num_g == 0 or gallery.shape[1] != dim:
        raise ValueError(f"Cannot rank queries {queries.shape} against gallery {gallery.shape}.")
    k = min(k, num_g)
    if num_q == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    n = mesh.size
    rows = max(-(-num_g // n), k)  # Gallery rows per device, before padding.
    num_tiles = max(1, min(-(-rows // gallery_tile), rows // k))  # Tiles of at least k rows.
    tile = -(-rows // num_tiles // _BLOCK) * _BLOCK
    rows = num_tiles * tile
    sharded = NamedSharding(mesh, P(mesh.axis_names))
    tiles = [_put(gallery, sharded, (n * tile, dim),
                  lambda r, t=t: r // tile * rows + t * tile + r % tile) for t in range(num_tiles)]
    chunk = query_chunk_size(num_q, query_chunk)
    init, step, merge = _ranker(mesh, chunk, dim, k, num_g, rows, tile)
    outputs = []
    for s in range(0, num_q, chunk):
        q = _put(queries[s:s + chunk], NamedSharding(mesh, P()), (chunk, dim))
        best = init()
        for t, g in enumerate(tiles):
            best = step(q, g, *best, np.int32(t))
        outputs.append(merge(*best))
    scores, indices = (np.concatenate([np.asarray(o[j].addressable_data(0)) for o in outputs])
                       for j in (0, 1))
    return scores[:num_q], indices[:num_q]


# ---------------------------------------------------------------------------------- embedding
_EMBEDDERS = {}


def _embedder(graphdef, model_state, mesh, rules):
    """Jitted (state, batch) -> (features dict, valid, row), all batch-sharded; cached."""
    key = (graphdef, mesh, rules)
    if key not in _EMBEDDERS:
        def embed(state, batch):
            return nnx.merge(graphdef, state).embed(batch), batch["valid"], batch["row"]
        batch_sh = sharding.batch_sharding(mesh, rules)
        _EMBEDDERS[key] = jax.jit(
            embed, in_shardings=(sharding.state_shardings(model_state, mesh, rules), batch_sh),
            out_shardings=batch_sh)
    return _EMBEDDERS[key]


def _allgather_strings(strings: list[str]) -> list[str]:
    """Every process's list, concatenated in process order, on every process."""
    if jax.process_count() == 1:
        return strings
    data = [s.encode() for s in strings]
    width = int(multihost_utils.process_allgather(np.int32(max(map(len, data), default=1))).max())
    buf = np.zeros((len(data), width), np.uint8)
    for row, d in zip(buf, data):
        row[:len(d)] = np.frombuffer(d, np.uint8)
    return [bytes(r).rstrip(b"\0").decode() for r in
            multihost_utils.process_allgather(buf, tiled=True)]


def embed_split(config, workdir: str, graphdef, model_state, mesh, rules, split: str
                ) -> tuple[dict[str, np.ndarray], list[str], list[list[str]]]:
    """({kind: features [N, D]}, item ids, labels) of `split`, valid rows in dataset order, on
    every process."""
    ds = input_pipeline.create_eval_dataset(config, workdir, split)
    batch_sh = sharding.batch_sharding(mesh, rules)
    rows_per_host = len(ds) * ds.batch_size
    outputs, records = [], []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        embed = _embedder(graphdef, model_state, mesh, rules)
        for b, (batch, item_ids, labels) in enumerate(ds):
            start = jax.process_index() * rows_per_host + b * ds.batch_size
            batch["row"] = np.arange(start, start + len(item_ids), dtype=np.int32)
            outputs.append(embed(model_state, input_pipeline.make_global_batch(batch, batch_sh)))
            records += [json.dumps([i, ls], ensure_ascii=False) for i, ls in zip(item_ids, labels)]
    features, valid, row = jax.tree.map(lambda *xs: np.concatenate(xs),
                                        *multihost_utils.process_allgather(outputs, tiled=True))
    records = [json.loads(r) for r in _allgather_strings(records)]
    order = np.argsort(row, kind="stable")
    keep = order[valid[order] == 1]
    features = {kind: np.asarray(f[keep], np.float32) for kind, f in features.items()}
    for kind, f in features.items():
        if not np.isfinite(f).all():
            raise FloatingPointError(f"The model gives non-finite {kind} features on {split}: "
                                     "the checkpoint or the training run diverged.")
    records = [records[r] for r in row[keep]]
    return features, [r[0] for r in records], [r[1] for r in records]


# ------------------------------------------------------------------------------------- report
def _read_items(config, split: str, wanted: set[str]) -> dict[str, tuple[str, str]]:
    """{id: (title, thumbnail data URI)} for the `wanted` ids of `split`, read from TFDS.

    The URI is "" (the report draws a placeholder) when the dataset stores no images (the
    region-feature configs) or an image does not decode.
    """
    import tensorflow_datasets as tfds
    from PIL import Image

    builder = tfds.builder(config.dataset.name, data_dir=config.dataset.data_dir)
    has_images = "image" in builder.info.features
    ds = builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()} if has_images else None,
        read_config=tfds.ReadConfig(try_autocache=False))
    items = {}
    for ex in tfds.as_numpy(ds):
        if ex["id"].decode() not in wanted:
            continue
        uri = ""
        if not has_images:
            items[ex["id"].decode()] = (ex["title"].decode(), uri)
            continue
        try:
            image = Image.open(io.BytesIO(ex["image"])).convert("RGB")
            image.thumbnail((_THUMB, _THUMB))
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=85)
            uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        except Exception as e:  # A bad image must not stop the evaluation.
            logging.warning("report: cannot decode the image of %s: %s", ex["id"], e)
        items[ex["id"].decode()] = (ex["title"].decode(), uri)
    return items


_CSS = """body{font-family:sans-serif;margin:16px;color:#222}table.s{border-collapse:collapse}
table.s td,table.s th{border:1px solid #bbb;padding:3px 10px;text-align:right}
.q{display:flex;gap:12px;border-top:2px solid #888;padding:10px 0}
.query{width:170px;flex:none;background:#eef3fb;padding:6px}
.hits{display:grid;grid-template-columns:repeat(5,150px);gap:8px}
.g{border:3px solid;padding:4px;font-size:12px}.hit{border-color:#1a8f2e}.miss{border-color:#c62828}
.mark{font-weight:bold;font-size:16px}.hit .mark{color:#1a8f2e}.miss .mark{color:#c62828}
img{width:128px;height:128px;object-fit:contain;background:#ddd;display:block}
.t{max-height:3.6em;overflow:hidden}.l{color:#555}"""


def write_report(path: str, title: str, scores: metrics.Scores, queries: list, gallery_labels,
                 items: dict[str, tuple[str, str]]) -> None:
    """Self-contained HTML: scores, then per query (id, labels, ranked ids) its top 10."""
    e, names = html.escape, ("mAP", "Prec", "mAR")
    img = lambda uri: f'<img src="{uri}" alt="">' if uri else '<img alt="no image">'
    out = [f'<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>'
           f'<style>{_CSS}</style></head><body><h1>{e(title)}</h1><table class="s"><tr><th></th>'
           + "".join(f"<th>{m}</th>" for m in names) + "</tr>"]
    out += [f"<tr><th>@{n[3:]}</th>" + "".join(f"<td>{s[m]:.2f}</td>" for m in names) + "</tr>"
            for n, s in scores.items()]
    out.append("</table><p>Green ✓: the item's label is one of the query's labels; red ✗: not.</p>")
    for qid, labels, ranked in queries:
        q_title, q_uri = items.get(qid, ("", ""))
        hits = sum(gallery_labels.get(g) in labels for g in ranked[:10])
        out.append(f'<div class="q"><div class="query">{img(q_uri)}<b>query {e(qid)}</b>'
                   f'<div class="t">{e(q_title) or "(no title)"}</div><div class="l">labels: '
                   f'{e(" | ".join(labels))}</div><b>{hits}/10 hits</b></div><div class="hits">')
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


# ----------------------------------------------------------------------------------- evaluate
def evaluate(config, workdir: str, graphdef, model_state, mesh, rules, *, step: int,
             writer=None) -> dict[str, dict]:
    """Embeds, ranks and scores every query split and feature kind: {"split/kind": scores}.

    Process 0 writes workdir/retrieval/<split>/<kind>/{retrieval_id_list.txt,
    metric_results.json, report.html} and the scalars `retrieval/<split>/<kind>/mAP@10`, ...
    """
    ec = config.eval
    g_feats, g_ids, g_labels = embed_split(config, workdir, graphdef, model_state, mesh, rules,
                                           ec.gallery_split)
    gallery_labels = {gid: ls[0] for gid, ls in zip(g_ids, g_labels) if ls}
    g_ids = np.asarray(g_ids)
    results, scalars, main = {}, {}, jax.process_index() == 0
    for split in ec.query_splits:
        q_feats, q_ids, q_labels = embed_split(config, workdir, graphdef, model_state, mesh,
                                               rules, split)
        sample = np.unique(np.linspace(0, len(q_ids) - 1, ec.report_queries).astype(int))
        ranked_by_kind = {}
        for kind in ec.feature_kinds:
            with jax.set_mesh(mesh):
                _, indices = top_k(q_feats[kind], g_feats[kind], ec.top_k, mesh,
                                   query_chunk=ec.query_chunk, gallery_tile=ec.gallery_tile)
            ranked = ranked_by_kind[kind] = g_ids[indices]
            scores, warnings = metrics.score(ranked, q_labels, gallery_labels, query_ids=q_ids)
            results[f"{split}/{kind}"] = scores
            for n, s in scores.items():
                scalars.update({f"retrieval/{split}/{kind}/{m}@{n[3:]}": v for m, v in s.items()})
            logging.info("retrieval %s/%s step %d: %s", split, kind, step, "  ".join(
                f"{n}: mAP {s['mAP']:.2f} Prec {s['Prec']:.2f} mAR {s['mAR']:.2f}"
                for n, s in scores.items()))
            for warning in warnings:
                logging.warning("retrieval %s/%s: %s", split, kind, warning)
            if main:
                out_dir = os.path.join(workdir, "retrieval", split, kind)
                os.makedirs(out_dir, exist_ok=True)
                metrics.write_retrieval_file(os.path.join(out_dir, "retrieval_id_list.txt"),
                                             q_ids, ranked)
                with open(os.path.join(out_dir, "metric_results.json"), "w") as f:
                    json.dump(scores, f, indent=2)
        if main and len(sample):
            wanted = {g for r in ranked_by_kind.values() for g in r[sample, :10].flat}
            items = _read_items(config, ec.gallery_split, wanted)
            items.update(_read_items(config, split, {q_ids[i] for i in sample}))
            for kind, ranked in ranked_by_kind.items():
                write_report(os.path.join(workdir, "retrieval", split, kind, "report.html"),
                             f"CAPTURE retrieval: {split} queries, {kind} features, step {step}",
                             results[f"{split}/{kind}"],
                             [(q_ids[i], q_labels[i], list(ranked[i])) for i in sample],
                             gallery_labels, items)
    if writer is not None and main:
        writer.write_scalars(step, scalars)
        writer.flush()
    return results
