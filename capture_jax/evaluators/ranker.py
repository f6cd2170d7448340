"""Exact top-k ranking of queries against a gallery, sharded over every device of a mesh.

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

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_BLOCK = 32  # Gallery rows per block of the block-maximum pruning (see the module docstring).

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


