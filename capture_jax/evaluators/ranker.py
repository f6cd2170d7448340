"""Exact top-k ranking of queries against a gallery, by one of three methods or `auto`.

`top_k(queries, gallery, k, mesh, method=...)` returns the float32 dot-product top-k, ties to the
lower gallery index (as a stable numpy argsort of -scores), whatever the method. Which is fastest
depends on the machine; docs/performance.md has the measurements (bench/retrieval.py on CPUs,
bench/device_check.py on accelerators). `auto`, the evaluator's default (`resolve_method`;
`stats["method"]` says which ran), takes `ACCELERATOR_AUTO` (`exact`) on GPUs and TPUs and
`faiss` on CPUs (`exact` if faiss-cpu, a requirement, is missing): on CPUs the faster of the two
depends on the BLAS faiss brings (1.5x `exact` on one machine, a third of it on another),
and faiss's own search is the number users compare with. `exact` stays one setting away where it wins:

* `exact`: float32 (`Precision.HIGHEST`) scores on the mesh's devices. The gallery is sharded by
  rows over all devices; each device scores a chunk of queries against its rows tile by tile and
  keeps a running top-k, then the per-device candidates are merged. Memory is bounded by
  query_chunk x gallery_tile scores per device, whatever the gallery size.
* `screen`: the same tiles, scored in bfloat16 (float32 accumulation), keeping a running list
  of each query's `screen_candidates` best by those scores; at the end only these candidates
  are rescored in float32 (from the float32 rows) and compete for the top-k. Exact by
  construction: with q~, g~ the bfloat16 roundings, |q.g - q~.g~| <= |q - q~| |g| +
  |q~| |g - g~| + the accumulation error (Cauchy-Schwarz; `screen_error_bound`). A query is
  certified when its k-th rescored score exceeds the largest bfloat16 score left out plus that
  bound; the queries that are not certified are ranked again by `exact` (`stats` says how
  many).
* `faiss`: faiss's exact `IndexFlatIP` search (`faiss.knn`, BLAS in blocks, bounded memory) on
  the host, with ties resolved to the lower index afterwards (`_faiss_top_k`). The field's
  reference implementation.

Within a tile, rows are grouped in blocks of `_BLOCK`; the n best of a tile lie in the n blocks
with the largest maxima (every block ranked above an element's block holds an element at least as
large), so only those blocks are searched. Ties go to the lower index: lax.top_k prefers the lower
position, and every concatenation (selected blocks and candidates in index order, running list
before the new tile, devices in row order) keeps positions in gallery-index order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_BLOCK = 32  # Gallery rows per block of the block-maximum pruning (see the module docstring).
METHODS = ("auto", "exact", "faiss", "screen")

# What `auto` runs on GPUs and TPUs: `exact` or `screen`, whichever bench/device_check.py's
# `ranker_choice` line found faster at 1M and 10M rows (docs/performance.md, Ranking).
ACCELERATOR_AUTO = "exact"

_RANKERS = {}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"Unknown ranking method {method!r}; choose one of {', '.join(METHODS)}.")
    return method


def resolve_method(method: str, mesh) -> str:
    """The method `top_k` runs for `method` on `mesh` (`auto` made concrete, see the module)."""
    if check_method(method) != "auto":
        return method
    if any(d.platform != "cpu" for d in mesh.devices.flat):
        return ACCELERATOR_AUTO
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "exact"
    return "faiss"


def _candidates(s, valid, n: int, left_out: bool = False):
    """Per row of scores s [c, tile]: positions [c, m] holding the row's n largest (the n blocks
    with the largest maxima, in index order; the whole tile where it has no more than n blocks)
    and their scores, invalid rows at -inf. With `left_out`, also the largest block maximum not
    searched (-inf if none)."""
    c, tile = s.shape
    s = jnp.where(valid, s, -jnp.inf)
    nb = tile // _BLOCK
    if nb <= n:
        pos = jnp.broadcast_to(jnp.arange(tile, dtype=jnp.int32), s.shape)
        return pos, s, jnp.full(c, -jnp.inf)
    block_max, blocks = jax.lax.top_k(s.reshape(c, nb, _BLOCK).max(-1), n + left_out)
    blocks = jnp.sort(blocks[:, :n], axis=-1)  # Index order, for the tie rule.
    pos = (blocks[:, :, None] * _BLOCK + jnp.arange(_BLOCK, dtype=jnp.int32)).reshape(c, -1)
    left = block_max[:, n] if left_out else jnp.full(c, -jnp.inf)
    return pos, jnp.take_along_axis(s, pos, axis=1), left


def _ranker(mesh, chunk: int, dim: int, k: int, num_valid: int, rows: int, tile: int,
            screen: int):
    """Jitted (init, step, finish). Device d owns gallery rows [d * rows, (d + 1) * rows) of
    `gallery` (float32) and `gallery16` (its bfloat16 copy, `screen` only), scored in tiles of
    `tile` rows: `step(q, gallery, gallery16, best_v, best_i, best_left, t)` folds tile t into each
    device's running best [devices, chunk, n] (n = k; with `screen`, n = screen candidates by
    their bfloat16 scores) and largest score left out [devices, chunk] (-inf without `screen`).
    `finish(q, gallery, best_v, best_i, best_left)` rescores a screen's candidates in float32,
    merges the devices and gives the replicated top-k [chunk, k] and largest screened-out score
    [chunk]."""
    key = (mesh, chunk, dim, k, num_valid, rows, tile, screen)
    if key in _RANKERS:
        return _RANKERS[key]
    axes, n = mesh.axis_names, mesh.size
    keep = screen or k
    dims = (((1,), (1,)), ((), ()))
    highest = jax.lax.Precision.HIGHEST

    def per_device(q, g, g16, best_v, best_i, best_left, t):
        start = t * tile
        base = jax.lax.axis_index(axes) * rows + start
        valid = base + jnp.arange(tile, dtype=jnp.int32) < num_valid
        if screen:
            s = jax.lax.dot_general(q.astype(jnp.bfloat16),
                                    jax.lax.dynamic_slice_in_dim(g16, start, tile), dims,
                                    preferred_element_type=jnp.float32)
        else:
            s = jax.lax.dot_general(q, jax.lax.dynamic_slice_in_dim(g, start, tile), dims,
                                    precision=highest, preferred_element_type=jnp.float32)
        pos, cand, left = _candidates(s, valid, keep, left_out=bool(screen))
        if screen:  # The best `keep` by screen score, and the largest one left out.
            v, p = jax.lax.top_k(cand, min(keep + 1, cand.shape[1]))
            if v.shape[1] > keep:
                left = jnp.maximum(left, v[:, keep])
        else:
            v, p = jax.lax.top_k(cand, min(keep, cand.shape[1]))
        v, p = v[:, :keep], p[:, :keep]
        v = jnp.concatenate([best_v[0], v], 1)  # Earlier tiles (lower indices) first.
        i = jnp.concatenate([best_i[0], base + jnp.take_along_axis(pos, p, axis=1)], 1)
        v, p = jax.lax.top_k(v, keep + 1 if screen else keep)
        if screen:  # What the running list drops is screened out too.
            left = jnp.maximum(jnp.maximum(best_left[0], left), v[:, keep])
            v, p = v[:, :keep], p[:, :keep]
        else:
            left = best_left[0]
        return v[None], jnp.take_along_axis(i, p, axis=1)[None], left[None]

    def rescore(q, g, best_v, best_i):
        """A screen's candidates (this device's rows) in float32, best k, ties to lower ids."""
        ids = jnp.sort(best_i[0], axis=-1)  # Index order, for the tie rule.
        local = ids - jax.lax.axis_index(axes) * rows
        exact = jnp.einsum("cd,cnd->cn", q, jnp.take(g, jnp.clip(local, 0, rows - 1), axis=0),
                           precision=highest)
        exact = jnp.where((ids >= 0) & (ids < num_valid), exact, -jnp.inf)
        v, p = jax.lax.top_k(exact, k)
        return v[None], jnp.take_along_axis(ids, p, axis=1)[None]

    def finish(q, g, v, i, left):
        if screen:
            v, i = jax.shard_map(rescore, mesh=mesh, in_specs=(P(), P(axes), P(axes), P(axes)),
                                 out_specs=(P(axes), P(axes)))(q, g, v, i)
        v, i = (x.transpose(1, 0, 2).reshape(chunk, n * k) for x in (v, i))  # Device order.
        v, p = jax.lax.top_k(v, k)
        return v, jnp.take_along_axis(i, p, axis=1), left.max(0)

    sharded, replicated = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
    init = jax.jit(lambda: (jnp.full((n, chunk, keep), -jnp.inf, jnp.float32),
                            jnp.full((n, chunk, keep), -1, jnp.int32),
                            jnp.full((n, chunk), -jnp.inf, jnp.float32)),
                   out_shardings=(sharded, sharded, sharded))
    step = jax.jit(jax.shard_map(per_device, mesh=mesh, out_specs=(P(axes),) * 3,
                                 in_specs=(P(), P(axes), P(axes), P(axes), P(axes), P(axes), P())),
                   donate_argnums=(3, 4, 5))
    _RANKERS[key] = init, step, jax.jit(finish, out_shardings=(replicated,) * 3)
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


def _bf16_error(x: np.ndarray | jax.Array):
    """Row norms of x, of its bfloat16 rounding, and of the rounding error (float32)."""
    xp = jnp if isinstance(x, jax.Array) else np
    x16 = x.astype(jnp.bfloat16 if xp is jnp else ml_dtypes.bfloat16).astype(np.float32)
    norm = lambda a: xp.sqrt(xp.sum(xp.square(a.astype(np.float64 if xp is np else jnp.float32)),
                                    axis=-1))
    return norm(x), norm(x16), norm(x - x16)


_to_bf16 = jax.jit(lambda g: g.astype(jnp.bfloat16))  # Keeps g's sharding.
_max_norms = jax.jit(lambda g: [x.max() for x in _bf16_error(g)])


def screen_error_bound(q_norm, q16_norm, dq_norm, g_norm, g16_norm, dg_norm, dim: int):
    """Bound on |q.g - fl(q~.g~)| for every gallery row g, from norms (see the module docstring):
    |q - q~| max|g| + |q~| max|g - g~| + the float32 accumulation error of both the bfloat16
    product and the float32 rescore (gamma_D |q| |g| each, with gamma_D = D u / (1 - D u))."""
    u = 2.0 ** -24
    gamma = dim * u / (1 - dim * u)
    return (dq_norm * g_norm + q16_norm * dg_norm
            + 2 * gamma * np.maximum(q_norm, q16_norm) * max(g_norm, g16_norm)) * (1 + 1e-3)  # slack for the norms' own rounding


def _faiss_top_k(queries, gallery, k, stats, margin: int = 8, redo_chunk: int = 64):
    """faiss's exact inner-product search, with ties at the cut resolved to the lower index.

    faiss keeps an arbitrary member of a tie group at the k-th place, so it is asked for k +
    `margin`; sorted by (score, index) (only rows with ties need it), the first k are exact
    wherever the k-th score beats the last returned one (nothing left out can tie it). The rare
    rows where it does not (a tie group longer than the margin: duplicated gallery items) are
    ranked again with numpy scores, `redo_chunk` rows at a time.
    """
    try:
        import faiss
    except ImportError as e:
        raise ImportError("Ranking method 'faiss' needs faiss-cpu: pip install -r "
                          "requirements.txt (or set config.evals.<name>.ranker='exact').") from e
    wide = min(k + margin, len(gallery))
    scores, indices = faiss.knn(queries, gallery, wide, metric=faiss.METRIC_INNER_PRODUCT)
    # faiss returns rows best first; only rows with a tie out of index order need re-sorting.
    tie_misordered = (scores[:, 1:] == scores[:, :-1]) & (indices[:, 1:] < indices[:, :-1])
    unsorted = np.flatnonzero((tie_misordered | (scores[:, 1:] > scores[:, :-1])).any(1))
    if len(unsorted):
        part_s, part_i = scores[unsorted], indices[unsorted]
        order = np.lexsort((part_i, -part_s), axis=-1)
        scores[unsorted] = np.take_along_axis(part_s, order, 1)
        indices[unsorted] = np.take_along_axis(part_i, order, 1)
    redo = np.flatnonzero(scores[:, k - 1] <= scores[:, -1]) if wide < len(gallery) else []
    scores, indices = scores[:, :k], indices[:, :k]
    stats["ranked_again"] = len(redo)
    for start in range(0, len(redo), redo_chunk):
        rows = redo[start:start + redo_chunk]
        scores[rows], indices[rows] = _top_k_of_scores(queries[rows] @ gallery.T, k)
    return scores.astype(np.float32), indices.astype(np.int32)


def _top_k_of_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each row of `scores` [Q, G] (k <= G), ties to the lower index: float32
    scores and int32 indices [Q, k]."""
    kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k]  # Each row's k-th largest.
    out_s, out_i = np.empty((len(scores), k), np.float32), np.empty((len(scores), k), np.int32)
    for j, row in enumerate(scores):
        cand = np.flatnonzero(row >= kth[j])  # In index order: a stable sort keeps ties so.
        keep = cand[np.argsort(-row[cand], kind="stable")[:k]]
        out_s[j], out_i[j] = row[keep], keep
    return out_s, out_i


FEW_QUERIES = 20  # faiss scans fewer queries than this row by row, without BLAS.


def few_top_k(queries: np.ndarray, gallery: np.ndarray, k: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` for a few queries on the host (the search server's): one BLAS product in numpy and
    the same tie rule. Below `FEW_QUERIES` faiss scores query by query without BLAS, 2-3x slower
    (docs/performance.md, Search); scores are [Q, G] in memory, so keep Q small."""
    scores = np.asarray(queries, np.float32) @ np.asarray(gallery, np.float32).T
    return _top_k_of_scores(scores, min(k, scores.shape[1]))


def top_k(queries, gallery, k: int, mesh, *, method: str = "auto", query_chunk: int = 1024,
          gallery_tile: int = 32768, screen_candidates: int = 256,
          stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of queries @ gallery.T: (scores [Q, k'], gallery indices [Q, k']), best first.

    k' = min(k, G). Ties go to the lower gallery index. `queries` [Q, D] and `gallery` [G, D] are
    host arrays, the same on every process; the result is returned on every process. `method`:
    see the module docstring. `stats`, if given, receives the method used and how many queries
    were ranked again (`faiss`: ties running past the margin; `screen`: not certified).
    """
    queries = np.ascontiguousarray(queries, np.float32)
    gallery = np.ascontiguousarray(gallery, np.float32)
    (num_q, dim), num_g = queries.shape, gallery.shape[0]
    if num_g == 0 or gallery.shape[1] != dim:
        raise ValueError(f"Cannot rank queries {queries.shape} against gallery {gallery.shape}.")
    method = resolve_method(method, mesh)
    stats = {} if stats is None else stats
    stats["method"] = method
    k = min(k, num_g)
    if num_q == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    if method == "faiss":
        return _faiss_top_k(queries, gallery, k, stats)
    screen = max(screen_candidates, k) if method == "screen" else 0
    n = mesh.size
    rows = max(-(-num_g // n), k)  # Gallery rows per device, before padding.
    num_tiles = max(1, min(-(-rows // gallery_tile), rows // k))  # Tiles of at least k rows.
    tile = -(-rows // num_tiles // _BLOCK) * _BLOCK
    rows = num_tiles * tile
    sharded = NamedSharding(mesh, P(mesh.axis_names))
    g = _put(gallery, sharded, (n * rows, dim))  # Device d: rows [d * rows, (d + 1) * rows).
    if screen:
        g16 = _to_bf16(g)
        g_norm, g16_norm, dg_norm = jax.device_get(_max_norms(g))
    else:
        g16 = g  # Unused by the exact step.
    chunk = query_chunk_size(num_q, query_chunk)
    init, step, finish = _ranker(mesh, chunk, dim, k, num_g, rows, tile, screen)
    outputs = []
    for s in range(0, num_q, chunk):
        q = _put(queries[s:s + chunk], NamedSharding(mesh, P()), (chunk, dim))
        best = init()
        for t in range(num_tiles):
            best = step(q, g, g16, *best, np.int32(t))
        outputs.append(finish(q, g, *best))
    scores, indices, left = (np.concatenate([np.asarray(o[j].addressable_data(0))
                                             for o in outputs])[:num_q] for j in (0, 1, 2))
    if screen:
        bound = screen_error_bound(*_bf16_error(queries), g_norm, g16_norm, dg_norm, dim)
        redo = np.flatnonzero(~(scores[:, -1] > left + bound))
        stats.update(certified=num_q - len(redo), ranked_again=len(redo))
        if len(redo):
            scores[redo], indices[redo] = top_k(
                queries[redo], gallery, k, mesh, method="exact", query_chunk=query_chunk,
                gallery_tile=gallery_tile)
    return scores, indices
