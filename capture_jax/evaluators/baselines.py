"""Untrained retrieval baselines, scored in the same evaluation as the model's features.

They give every score its context: what the titles alone give without any training (`tfidf`),
and what the pixels or detector features give without any training (`color_histogram`,
`region_mean`). Same queries, same gallery, same official scorer as the model's features.

* `tfidf`: character 1- and 2-gram TF-IDF of the lower-cased titles (Chinese words are mostly one
  or two characters). Raw term counts, smoothed IDF `ln((1 + G) / (1 + df)) + 1` fitted on the
  gallery titles (the collection being searched), L2-normalised rows; n-grams that no gallery
  title has are left out. Ranked exactly by cosine on the host (sparse matrices), ties to the
  lower gallery index.
* `color_histogram`: a joint RGB histogram (8 bins a channel, 512 bins) of the model's input
  image, square-rooted and L2-normalised (the Hellinger kernel), ranked like a model feature.
* `region_mean`: the mean of the image's detector region features, L2-normalised.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Baseline name -> visual front ends it applies to (None: any).
BASELINES = {"tfidf": None, "color_histogram": ("pixels",), "region_mean": ("regions",)}
DESCRIPTIONS = {
    "tfidf": "baseline, no training: character 1-2-gram TF-IDF of the titles (IDF from the "
             "gallery), cosine",
    "color_histogram": "baseline, no training: 8x8x8 RGB histogram of the input image, Hellinger",
    "region_mean": "baseline, no training: mean of the detector region features, cosine",
}
IMAGE_BASELINES = ("color_histogram", "region_mean")  # Computed from the batch, on device.
_BINS = 8  # Colour histogram bins per channel.
_NGRAMS = (1, 2)
_QUERY_CHUNK = 512  # TF-IDF queries scored at once (a dense [chunk, G] block).


def check(names: Sequence[str], visual_kind: str) -> None:
    """One sentence if a baseline is unknown or does not fit the visual front end."""
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"Unknown baseline {name!r} in config.evals.retrieval.baselines; "
                             f"choose from {sorted(BASELINES)}.")
        kinds = BASELINES[name]
        if kinds is not None and visual_kind not in kinds:
            raise ValueError(f"Baseline {name!r} needs a {'/'.join(kinds)} front end but the model "
                             f"has visual.kind={visual_kind!r}: drop it from "
                             "config.evals.retrieval.baselines.")


def image_features(batch: Mapping[str, jax.Array], names: Sequence[str], mean, std
                   ) -> dict[str, jax.Array]:
    """The image baselines of `names` from an eval batch (inside the jitted embedder)."""
    out = {}
    if "color_histogram" in names:
        pixels = batch["image"].astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)
        q = jnp.clip(jnp.floor(pixels * _BINS), 0, _BINS - 1).astype(jnp.int32)
        bins = (q[..., 0] * _BINS + q[..., 1]) * _BINS + q[..., 2]
        bins = bins.reshape(bins.shape[0], -1)
        hist = jax.vmap(lambda b: jnp.bincount(b, length=_BINS**3))(bins).astype(jnp.float32)
        out["color_histogram"] = _l2(jnp.sqrt(hist / bins.shape[1]))
    if "region_mean" in names:
        feats = batch["visual_feats"].astype(jnp.float32)
        mask = batch["visual_mask"].astype(jnp.float32)[..., None]
        out["region_mean"] = _l2((feats * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0))
    return out


def _l2(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _grams(title: str) -> collections.Counter:
    t = title.lower()
    return collections.Counter(t[i:i + n] for n in _NGRAMS for i in range(len(t) - n + 1))


class TfIdf:
    """Character n-gram TF-IDF fitted on the gallery titles; `top_k` ranks query titles."""

    def __init__(self, gallery_titles: Sequence[str]):
        import scipy.sparse  # A dependency of JAX; imported here, the only user.

        self._sparse = scipy.sparse
        self.vocab: dict[str, int] = {}
        counts = [_grams(t) for t in gallery_titles]
        for c in counts:
            for gram in c:
                self.vocab.setdefault(gram, len(self.vocab))
        matrix = self._matrix(counts)
        df = np.bincount(matrix.indices, minlength=len(self.vocab))
        self.idf = np.log((1 + len(gallery_titles)) / (1 + df)) + 1
        self.gallery = self._weigh(matrix)

    def _matrix(self, counts: Sequence[collections.Counter]):
        indptr, indices, data = [0], [], []
        for c in counts:
            known = [(self.vocab[g], v) for g, v in c.items() if g in self.vocab]
            indices += [i for i, _ in known]
            data += [v for _, v in known]
            indptr.append(len(indices))
        return self._sparse.csr_matrix((np.asarray(data, np.float64), indices, indptr),
                                       shape=(len(counts), len(self.vocab)))

    def _weigh(self, matrix):
        matrix = matrix.multiply(self.idf[None]).tocsr()
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(1))).ravel()
        return (self._sparse.diags(1 / np.maximum(norms, 1e-12)) @ matrix).tocsr()

    def top_k(self, query_titles: Sequence[str], k: int) -> np.ndarray:
        """Gallery indices [Q, min(k, G)] by cosine, best first, ties to the lower index."""
        queries = self._weigh(self._matrix([_grams(t) for t in query_titles]))
        k = min(k, self.gallery.shape[0])
        out = []
        for s in range(0, queries.shape[0], _QUERY_CHUNK):
            scores = (queries[s:s + _QUERY_CHUNK] @ self.gallery.T).toarray()
            out.append(np.argsort(-scores, axis=1, kind="stable")[:, :k])
        return np.concatenate(out) if out else np.zeros((0, k), np.int64)
