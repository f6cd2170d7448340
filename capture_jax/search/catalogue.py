"""The index on disk (format: the package docstring): made from a built split or from a
directory in the official text format with its images, read back, and searched.

Search is the evaluator's exact ranker (`evaluators/ranker.py`, method `auto`: faiss's exact
search on CPUs; for the server's few queries at a time on CPUs, its `few_top_k`), or, where
an index was made with `--approximate`, faiss's IVF or HNSW index (docs/performance.md has
their recall@10 against the exact search and their latency).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
from collections.abc import Callable

import numpy as np
from absl import logging
from PIL import Image

from capture_jax.evaluators import ranker

FORMAT = "capture_jax.search.index/1"
THUMBNAIL = 128  # Longest side of the stored thumbnails, in pixels.
APPROXIMATE = ("ivf", "hnsw")
Progress = Callable[[int, int], None]


def thumbnail(jpeg: bytes) -> bytes:
    """A small JPEG of an image (b"" if it cannot be read)."""
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            image.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG: decoded at a reduced scale.
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            out = io.BytesIO()
            image.save(out, "JPEG", quality=85)
            return out.getvalue()
    except Exception as e:  # A bad catalogue image costs its thumbnail, not the index.
        logging.warning("No thumbnail: %s", e)
        return b""


# ------------------------------------------------------------------------------ sources
def from_split(model, split: str, data_dir: str | None, batch_size: int, kinds, progress,
               thumbnails: bool = True):
    """(features, ids, titles, thumbnails, source, max_image_side) of a built split, embedded as
    the evaluator embeds it (`embedding.embed_split`)."""
    from capture_jax import experiment  # Imports the TFDS builder: only for built splits.
    from capture_jax.evaluators import embedding, report

    config = model.config.copy_and_resolve_references()
    if data_dir:
        config.dataset.data_dir = data_dir
    exp = experiment.setup(config, model.workdir)
    embedded = embedding.embed_split(exp, model.state, split, batch_size, progress=progress)
    features = {k: embedded.features[k] for k in kinds}
    thumbs = [b""] * len(embedded.ids)
    if thumbnails and "image" in exp.builder.info.features:
        items = report.read_items(exp.builder, split, set(embedded.ids))
        thumbs = [base64.b64decode(items[i][1].split(",", 1)[1]) if items[i][1] else b""
                  for i in embedded.ids]
    source = {"split": split, "dataset": config.dataset.name,
              "data_dir": exp.builder.data_dir}
    max_side = getattr(exp.builder.builder_config, "max_image_side", 256)
    return features, embedded.ids, embedded.titles, thumbs, source, max_side


def from_directory(model, directory: str, split: str, images: str | None, max_side: int, kinds,
                   progress, thumbnails: bool = True):
    """The same from an official split file in `directory` and `<id>.jpg` images under `images`
    (default: `directory`), each image cleaned as the dataset builder cleans it; rows without a
    readable image are left out and counted."""
    import tensorflow as tf

    from capture_jax import visual_inputs
    from tfds_product1m import product1m_files

    if model.visual_kind != "pixels":
        raise ValueError("This model reads detector region features (model.visual.kind="
                         f"{model.visual_kind}): index a built split of its dataset instead of a "
                         "directory of pictures.")
    path = os.path.join(directory, product1m_files.split_filename(split))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --catalogue must hold the official "
                                f"{product1m_files.split_filename(split)} (or choose --split).")
    rows, _ = product1m_files.read_split_file(path, split)
    found, _ = product1m_files.index_images(images or directory)
    ids, titles, thumbs, skipped = [], [], [], {"missing_image": 0, "bad_image": 0}
    out: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    chunk = model.batch_size * 8
    for start in range(0, len(rows), chunk):
        batch_rows, jpegs = [], []
        for row in rows[start:start + chunk]:
            if row.id not in found:
                skipped["missing_image"] += 1
                continue
            with open(found[row.id], "rb") as f:
                data = f.read()
            try:
                jpegs.append(product1m_files.clean_image(data, max_side).jpeg)
            except product1m_files.BadImageError:
                skipped["bad_image"] += 1
                continue
            batch_rows.append(row)
        if batch_rows:
            rows_np = model.empty_rows(len(batch_rows))
            ids_t, mask_t = model.tokenizer.encode(tf.constant([r.title for r in batch_rows]))
            rows_np["text_ids"], rows_np["text_mask"] = ids_t.numpy(), mask_t.numpy()
            rows_np["image"] = visual_inputs.normalize_images(tf.stack(
                [visual_inputs.decode_image(j, model.image_size) for j in jpegs])).numpy()
            for kind, f in model.embed(rows_np, kinds).items():
                out[kind].append(f)
            ids += [r.id for r in batch_rows]
            titles += [r.title for r in batch_rows]
            thumbs += [thumbnail(j) if thumbnails else b"" for j in jpegs]
        progress(min(start + chunk, len(rows)), len(rows))
    if any(skipped.values()):
        logging.warning("Left out of the index: %s (of %d rows of %s).", skipped, len(rows), path)
    if not ids:
        raise ValueError(f"No row of {path} has a readable image under {images or directory}: "
                         "point --images at the downloaded pictures (<id>.jpg).")
    features = {k: np.concatenate(v) for k, v in out.items()}
    return features, ids, titles, thumbs, {"directory": os.path.abspath(directory),
                                           "split": split, "skipped": skipped}, max_side


# ------------------------------------------------------------------------------ on disk
def write(path: str, model, kinds, features, ids, titles, thumbs, source, max_side,
          approximate: str | None = None) -> dict:
    """Writes an index directory; returns its manifest."""
    os.makedirs(path, exist_ok=True)
    for kind in kinds:
        np.save(os.path.join(path, f"{kind}.npy"), np.ascontiguousarray(features[kind],
                                                                        np.float32))
    offset = 0
    with open(os.path.join(path, "items.jsonl"), "w", encoding="utf-8") as items, \
            open(os.path.join(path, "thumbnails.bin"), "wb") as blobs:
        for item_id, title, thumb in zip(ids, titles, thumbs, strict=True):
            items.write(json.dumps({"id": item_id, "title": title,
                                    "thumbnail": [offset, len(thumb)]}, ensure_ascii=False)
                        + "\n")
            blobs.write(thumb)
            offset += len(thumb)
    manifest = {"format": FORMAT, **model.fingerprint, "feature_kinds": list(kinds),
                "dims": {k: int(features[k].shape[1]) for k in kinds}, "count": len(ids),
                "source": source, "max_image_side": int(max_side),
                "image_size": model.image_size, "approximate": approximate,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if approximate:
        for kind in kinds:
            build_approximate(features[kind], approximate, os.path.join(
                path, f"{kind}.{approximate}.faiss"))
    with open(os.path.join(path, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    return manifest


def build_approximate(features: np.ndarray, method: str, path: str | None = None):
    """A faiss approximate inner-product index of `features` (IVF: sqrt(N) lists trained on 40
    rows per list, 16 probed; HNSW: 32 links, efSearch 128), saved to `path` if given."""
    import faiss

    n, dim = features.shape
    features = np.ascontiguousarray(features, np.float32)
    if method == "ivf":
        lists = max(1, min(int(math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = features[np.random.default_rng(0).choice(n, min(n, 40 * lists), replace=False)]
        index.train(sample)
        index.nprobe = min(16, lists)
    elif method == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"Unknown approximate index {method!r}; choose one of {APPROXIMATE}.")
    index.add(features)
    if path:
        faiss.write_index(index, path)
    return index


class Index:
    """An index directory read back; `search` ranks its rows for query features."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        manifest_path = os.path.join(self.path, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise FileNotFoundError(f"{manifest_path} not found: --index must be a directory "
                                    "written by `python -m capture_jax.search index`.")
        with open(manifest_path, encoding="utf-8") as f:
            self.manifest = m = json.load(f)
        if m.get("format") != FORMAT:
            raise ValueError(f"{self.path} is an index of format {m.get('format')!r}, not "
                             f"{FORMAT!r}: index the catalogue again with this version.")
        self.features = {}
        for kind in m["feature_kinds"]:
            self.features[kind] = np.load(os.path.join(self.path, f"{kind}.npy"))
            if self.features[kind].shape != (m["count"], m["dims"][kind]):
                raise ValueError(f"{self.path}/{kind}.npy has shape {self.features[kind].shape}, "
                                 f"not the manifest's ({m['count']}, {m['dims'][kind]}): the "
                                 "index is damaged; index the catalogue again.")
        with open(os.path.join(self.path, "items.jsonl"), encoding="utf-8") as f:
            items = [json.loads(line) for line in f]
        self.ids = [i["id"] for i in items]
        self.titles = [i["title"] for i in items]
        self.thumbs = [tuple(i["thumbnail"]) for i in items]
        self._blobs = np.memmap(os.path.join(self.path, "thumbnails.bin"), np.uint8, "r") \
            if any(n for _, n in self.thumbs) else None
        self._approximate = {}

    def thumbnail(self, row: int) -> bytes:
        offset, size = self.thumbs[row]
        return bytes(self._blobs[offset:offset + size]) if size else b""

    def approximate(self, kind: str):
        """The saved faiss approximate index of `kind` (loaded once)."""
        if kind not in self._approximate:
            import faiss

            method = self.manifest.get("approximate")
            path = os.path.join(self.path, f"{kind}.{method}.faiss")
            if not method or not os.path.isfile(path):
                raise ValueError(f"{self.path} has no approximate index: index again with "
                                 "--approximate=ivf or hnsw, or search exactly.")
            self._approximate[kind] = faiss.read_index(path)
        return self._approximate[kind]

    def search(self, kind: str, queries: np.ndarray, k: int, mesh,
               approximate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) [n, min(k, count)], best first; exact unless `approximate`."""
        queries = np.ascontiguousarray(queries, np.float32)
        if approximate:
            scores, rows = self.approximate(kind).search(queries, min(k, len(self.ids)))
            return scores, rows
        if len(queries) < ranker.FEW_QUERIES and ranker.resolve_method("auto", mesh) == "faiss":
            return ranker.few_top_k(queries, self.features[kind], k)  # CPUs: see its docstring.
        return ranker.top_k(queries, self.features[kind], k, mesh, method="auto")
