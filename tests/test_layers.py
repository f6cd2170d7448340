"""Building blocks against small numpy references written from docs/reference.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capture_jax.models import layers
from fake_batches import FAST_COMPILE

COMMON = layers.Common(dtype=jnp.float32, dropout_rate=0.1, attention_dropout_rate=0.1)
_erf = np.vectorize(math.erf)


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_attention(q, k, v, bias):
    logits = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1]) + bias
    return np.einsum("bnts,bsnd->btnd", np_softmax(logits), v)


def np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def np_quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def np_ln(x, norm, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    scale, bias = np.asarray(norm.scale[...]), np.asarray(norm.bias[...])
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_linear(x, lin):
    return x @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...])


def np_heads(x, n):
    return x.reshape(*x.shape[:-1], n, -1)


def np_merge(x):
    return x.reshape(*x.shape[:-2], -1)


def np_bias(mask, value):
    return ((1.0 - mask) * value)[:, None, None, :]


def randomize(module, seed=0, std=0.5):
    """Replaces every parameter by N(0, std) values so that mistakes are not hidden by init."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


def jit_call(module, *args):
    """module(*args), compiled once (eager op-by-op dispatch is slower on CPU)."""
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a), compiler_options=FAST_COMPILE)
    return fn(state, *map(jnp.asarray, args))


def make(cls, *args):
    with nnx.use_eager_sharding(False):
        return randomize(cls(*args, COMMON, nnx.Rngs(0)))


def masks(rng, b, n):
    mask = np.ones((b, n), np.float32)
    mask[0, n // 2:] = 0.0
    mask[-1, -1] = 0.0
    return mask


def test_attention_matches_numpy():
    rng = np.random.default_rng(0)
    shapes = [(2, 5, 3, 4), (2, 7, 3, 4), (2, 7, 3, 4)]
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in shapes)
    bias = np_bias(masks(rng, 2, 7), -10000.0)
    expected = np_attention(q, k, v, bias)
    fused = layers.dot_product_attention(q, k, v, jnp.asarray(bias))
    np.testing.assert_allclose(fused, expected, atol=1e-5)
    # The written-out path (taken when probability dropout is on) has the same maths.
    explicit = layers.dot_product_attention(q, k, v, jnp.asarray(bias), dropout_rate=1e-9,
                                            dropout_key=jax.random.key(0))
    np.testing.assert_allclose(explicit, expected, atol=1e-5)
    dropped = [layers.dot_product_attention(q, k, v, jnp.asarray(bias), dropout_rate=0.5,
                                            dropout_key=jax.random.key(s)) for s in (1, 1, 2)]
    np.testing.assert_array_equal(dropped[0], dropped[1])
    assert not np.allclose(dropped[0], expected, atol=1e-3)
    assert not np.allclose(dropped[0], dropped[2], atol=1e-3)


def test_dropout_and_activations():
    x = jnp.ones((200, 100))
    assert layers.dropout(x, 0.5, None) is x
    y = np.asarray(layers.dropout(x, 0.25, jax.random.key(0)))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.01
    z = np.linspace(-4, 4, 33, dtype=np.float32)
    np.testing.assert_allclose(layers.gelu(z), np_gelu(z), atol=1e-6)
    np.testing.assert_allclose(layers.quick_gelu(z), np_quick_gelu(z), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm(dtype):
    with nnx.use_eager_sharding(False):
        norm = randomize(layers.LayerNorm(16, layers.Common(dtype=dtype)))
    x = np.random.default_rng(0).normal(3.0, 2.0, (4, 16)).astype(np.float32)
    y = norm(jnp.asarray(x, dtype))
    assert y.dtype == dtype and norm.scale[...].dtype == jnp.float32
    ref = np_ln(np.asarray(jnp.asarray(x, dtype), np.float32), norm)
    atol = 1e-5 if dtype == jnp.float32 else 0.1
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=atol)


def np_bert_layer(layer, x, mask):
    a, f, n = layer.attention, layer.ffn, layer.attention.num_heads
    q, k, v = (np_heads(np_linear(x, p), n) for p in (a.query, a.key, a.value))
    ctx = np_merge(np_attention(q, k, v, np_bias(mask, -10000.0)))
    h = np_ln(x + np_linear(ctx, a.out), a.norm)
    return np_ln(h + np_linear(np_gelu(np_linear(h, f.intermediate)), f.output), f.norm)


def test_bert_layer_matches_numpy():
    layer = make(layers.BertLayer, 12, 3, 20)
    rng = np.random.default_rng(1)
    x, mask = rng.normal(size=(2, 6, 12)).astype(np.float32), masks(rng, 2, 6)
    y = jit_call(layer, x, layers.attention_bias(jnp.asarray(mask), -10000.0))
    np.testing.assert_allclose(y, np_bert_layer(layer, x, mask), atol=1e-5)


def test_co_attention_matches_numpy():
    layer = make(layers.CoAttentionLayer, 12, 8, 2, 20, 10)
    rng = np.random.default_rng(2)
    t = rng.normal(size=(2, 6, 12)).astype(np.float32)
    v = rng.normal(size=(2, 4, 12)).astype(np.float32)
    t_mask, v_mask = masks(rng, 2, 6), masks(rng, 2, 4)
    t_bias, v_bias = np_bias(t_mask, -10000.0), np_bias(v_mask, -10000.0)
    heads = lambda proj, x: np_heads(np_linear(x, proj), 2)  # noqa: E731
    # Spec: text attends to visual (C1), visual attends to text (C2), no self-attention.
    c1 = np_merge(np_attention(heads(layer.text_query, t), heads(layer.visual_key, v),
                               heads(layer.visual_value, v), v_bias))
    c2 = np_merge(np_attention(heads(layer.visual_query, v), heads(layer.text_key, t),
                               heads(layer.text_value, t), t_bias))
    v1 = np_ln(v + np_linear(c2, layer.visual_out), layer.visual_norm)
    t1 = np_ln(t + np_linear(c1, layer.text_out), layer.text_norm)

    def ffn(f, x):
        return np_ln(x + np_linear(np_gelu(np_linear(x, f.intermediate)), f.output), f.norm)

    got_t, got_v = jit_call(layer, t, v, t_bias, v_bias)
    np.testing.assert_allclose(got_t, ffn(layer.text_ffn, t1), atol=1e-5)
    np.testing.assert_allclose(got_v, ffn(layer.visual_ffn, v1), atol=1e-5)


def test_joint_block_matches_numpy():
    block = make(layers.JointBlock, 12, 3, 24)
    rng = np.random.default_rng(3)
    x, mask = rng.normal(size=(2, 7, 12)).astype(np.float32), masks(rng, 2, 7)
    bias = np_bias(mask, -1e6)
    # PyTorch nn.MultiheadAttention: in_proj rows [q; k; v] (our kernel columns), heads contiguous.
    qkv = np_linear(np_ln(x, block.attention_norm), block.attention.in_proj)
    q, k, v = (np_heads(t, 3) for t in np.split(qkv, 3, axis=-1))
    h = x + np_linear(np_merge(np_attention(q, k, v, bias)), block.attention.out_proj)
    mlp_hidden = np_quick_gelu(np_linear(np_ln(h, block.mlp_norm), block.mlp_in))
    ref = h + np_linear(mlp_hidden, block.mlp_out)
    np.testing.assert_allclose(jit_call(block, x, bias), ref, atol=1e-5)


def test_parameters_have_logical_names():
    layer = make(layers.CoAttentionLayer, 12, 8, 2, 20, 10)
    for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim, path
        assert set(names) <= {"embed", "heads", "kv", "mlp", "vocab", "feature", None}, path
        assert var.dtype == jnp.float32


def test_run_stack_remat_matches_plain():
    with nnx.use_eager_sharding(False):
        stack = nnx.List([randomize(layers.BertLayer(8, 2, 16, COMMON, nnx.Rngs(i)), seed=i)
                          for i in range(2)])
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 8)), jnp.float32)
    bias = layers.attention_bias(jnp.ones((2, 5)), -10000.0)
    graphdef, state = nnx.split(stack)

    def loss(state, remat, key):
        out = layers.run_stack(nnx.merge(graphdef, state), x, bias, remat=remat,
                               keys=layers.split_key(key, 2))
        return jnp.sum(out**2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1, compiler_options=FAST_COMPILE)
    key = jax.random.key(0)  # with dropout: the recomputation must replay the same masks
    assert "remat" in str(jax.make_jaxpr(loss, static_argnums=1)(state, True, key))
    plain, remat = grad(state, False, key), grad(state, True, key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain, remat)


def test_cudnn_layout_keeps_attention_exact():
    """What cuDNN is given (even lengths, [B, 1, T, S] bias) gives the same first T rows."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in [(2, 5, 3, 4), (2, 7, 3, 4),
                                                                  (2, 7, 3, 4)])
    bias = np_bias(masks(rng, 2, 7), -10000.0)
    q2, k2, v2, b2 = layers.cudnn_layout(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         jnp.asarray(bias))
    assert q2.shape == (2, 6, 3, 4) and k2.shape == v2.shape == (2, 8, 3, 4)
    assert b2.shape == (2, 1, 6, 8) and b2.dtype == q2.dtype
    padded = jax.nn.dot_product_attention(q2, k2, v2, bias=b2, implementation="xla")[:, :5]
    np.testing.assert_allclose(padded, np_attention(q, k, v, bias), atol=1e-5)
    # An explicit 'xla' implementation is the default path.
    xla = layers.dot_product_attention(q, k, v, jnp.asarray(bias), implementation="xla")
    np.testing.assert_array_equal(xla, layers.dot_product_attention(q, k, v, jnp.asarray(bias)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_lookup_dense_gradient_equals_the_scatter(dtype):
    """`lookup(..., "dense")` (one-hot matmul gradient, for accelerators) gives the embedding's
    values and the scatter's gradient, with repeated ids (padding) as in a real batch; in
    bfloat16 it accumulates in float32 (the scatter in bfloat16), so it is at least as close to
    the float64 sum, up to the final rounding to bfloat16."""
    emb = nnx.Embed(50, 8, dtype=dtype, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.where(rng.uniform(size=(6, 9)) < 0.4, 0, rng.integers(0, 50, (6, 9))))
    weights = jnp.asarray(rng.standard_normal((6, 9, 8)), jnp.float32)

    def grad(how):
        loss = lambda e: (layers.lookup(e, ids, how).astype(jnp.float32) * weights).sum()
        return np.asarray(nnx.grad(loss)(emb).embedding[...], np.float64)

    np.testing.assert_array_equal(layers.lookup(emb, ids, "dense"), emb(ids))
    exact = np.zeros((50, 8))  # The float64 sum of the cotangents (weights in `dtype`).
    np.add.at(exact, np.asarray(ids).ravel(),
              np.asarray(weights.astype(dtype), np.float64).reshape(-1, 8))
    scatter, dense = grad("scatter"), grad("dense")
    if dtype == jnp.float32:
        np.testing.assert_allclose(dense, scatter, rtol=1e-5, atol=1e-5)
    assert np.abs(dense - exact).max() <= np.abs(scatter - exact).max() + 1e-6
    rtol = 1e-5 if dtype == jnp.float32 else 2 ** -8
    np.testing.assert_allclose(dense, exact, rtol=rtol, atol=1e-4)
    with pytest.raises(ValueError, match="Unknown embedding gradient 'sparse'"):
        layers.lookup(emb, ids, "sparse")
