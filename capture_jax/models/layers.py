"""CAPTURE's building blocks: attention, the post-LN BERT layer, the co-attention layer and the
pre-LN joint block.

Conventions shared by every block here:
- Parameters are float32; matmuls run in `Common.dtype`; LayerNorm statistics and softmax run in
  float32 (the stream between blocks stays in the compute dtype).
- Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, `feature`)
  and the main activations are constrained to `('batch', 'length', 'embed')`; `sharding.py` maps
  the names onto the mesh.
- Dropout is functional: each call takes a `dropout_key` (None means deterministic) and splits it
  for its sub-layers, so the randomness of a step is a pure function of the key the caller passes.
- Linear layers are `nnx.Linear` (kernel [in, out], i.e. the transposed PyTorch weight).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from capture_jax.sharding import constrain

Array = jax.Array
Key = jax.Array | None
ACTIVATION = ("batch", "length", "embed")
HEADS = ("batch", "length", "heads", "kv")
STREAM_MASK_VALUE = -10000.0  # additive mask in the streams and co-attention (reference)
JOINT_MASK_VALUE = -1e6  # additive mask in the joint encoder (reference)


@dataclasses.dataclass(frozen=True)
class Common:
    """Settings every block shares."""

    dtype: Any = jnp.float32  # compute dtype of matmuls and of the residual stream
    init_std: float = 0.02  # N(0, std) for every Linear/Embedding weight
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.1  # hidden dropout (embeddings, residual branches)
    attention_dropout_rate: float = 0.1  # dropout on attention probabilities
    # `implementation` of jax.nn.dot_product_attention: None (JAX chooses), "xla" or "cudnn".
    attention_impl: str | None = None


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, as in BERT."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: Array) -> Array:
    """CLIP's QuickGELU, x * sigmoid(1.702 x), used in the joint encoder."""
    return x * jax.nn.sigmoid(1.702 * x)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps) along the last axis, in float32 (torch.nn.functional.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def split_key(key: Key, num: int) -> list[Key]:
    """`num` independent keys, or `num` Nones when `key` is None (no dropout)."""
    return [None] * num if key is None else list(jax.random.split(key, num))


def dropout(x: Array, rate: float, key: Key) -> Array:
    """Inverted dropout; the identity when `key` is None or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention_bias(mask: Array, mask_value: float) -> Array:
    """Additive float32 bias [B, 1, 1, S] from a key mask [B, S] (1 = attend, 0 = padding)."""
    return ((1.0 - mask.astype(jnp.float32)) * mask_value)[:, None, None, :]


def cudnn_layout(query: Array, key: Array, value: Array, bias: Array
                 ) -> tuple[Array, Array, Array, Array]:
    """Inputs as cuDNN's fused attention takes them; the first T rows of its output are exact.

    cuDNN wants the bias as [B, 1, T, S] in the inputs' dtype and, when training with a bias,
    even T and S: q gets zero rows and k/v zero columns up to even lengths, and the padded key
    columns get a bias of -1e9 (probability 0), so the real rows' results are unchanged.
    """
    t, s = query.shape[1], key.shape[1]
    pad_t, pad_s = t % 2, s % 2
    if pad_t:
        query = jnp.pad(query, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    if pad_s:
        key, value = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (key, value))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, pad_s)), constant_values=-1e9)
    bias = jnp.broadcast_to(bias, (bias.shape[0], 1, t + pad_t, s + pad_s))
    return query, key, value, bias.astype(query.dtype)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array,
    *,
    dropout_rate: float = 0.0,
    dropout_key: Key = None,
    implementation: str | None = None,
) -> Array:
    """softmax(q k^T / sqrt(d) + bias) v per head; q [B, T, N, D], k and v [B, S, N, D].

    Uses `jax.nn.dot_product_attention` with `implementation` (None: JAX's choice, "xla", or
    "cudnn": cuDNN's fused kernel, GPU and bfloat16/float16 only, inputs laid out by
    `cudnn_layout`) unless dropout on the attention probabilities is active, which that API does
    not offer; then the same maths is written out (logits and softmax in float32 in both paths).
    """
    if (dropout_key is None or dropout_rate == 0.0) and implementation == "cudnn":
        q, k, v, b = cudnn_layout(query, key, value, bias)
        out = jax.nn.dot_product_attention(q, k, v, bias=b, implementation="cudnn")
        return out[:, :query.shape[1]]
    if dropout_key is None or dropout_rate == 0.0:
        return jax.nn.dot_product_attention(query, key, value, bias=bias,
                                            implementation=implementation)
    logits = jnp.einsum("btnd,bsnd->bnts", query, key, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(query.shape[-1]) + bias
    probs = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, dropout_key)
    return jnp.einsum("bnts,bsnd->btnd", probs.astype(value.dtype), value)


def dense(
    in_dim: int, out_dim: int, names: tuple[str | None, str | None], common: Common, rngs: nnx.Rngs
) -> nnx.Linear:
    """Linear layer with N(0, std) kernel, zero bias and logical names (in, out)."""
    return nnx.Linear(
        in_dim,
        out_dim,
        dtype=common.dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(common.init_std), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs,
    )


@jax.custom_vjp
def _lookup_dense_grad(table: Array, ids: Array) -> Array:
    return jnp.take(table, ids, axis=0)


def _lookup_fwd(table, ids):
    return jnp.take(table, ids, axis=0), (table, ids)  # The table is live anyway (a parameter).


def _lookup_bwd(res, g):
    table, ids = res
    flat = g.reshape(-1, g.shape[-1])
    one_hot = jax.nn.one_hot(ids.reshape(-1), table.shape[0], dtype=flat.dtype)
    grad = jnp.einsum("nv,nd->vd", one_hot, flat, preferred_element_type=jnp.float32)
    return grad.astype(table.dtype), None


_lookup_dense_grad.defvjp(_lookup_fwd, _lookup_bwd)


def lookup(embed: nnx.Embed, ids: Array, gradient: str = "scatter") -> Array:
    """`embed(ids)` (the same values), with the table's gradient as `gradient` says: "scatter"
    (XLA's scatter-add, the gradient of a gather) or "dense" (one_hot(ids)^T @ g, a matmul).

    On GPUs the scatter adds with atomics, and ids repeated across the batch ([PAD], [CLS],
    [SEP], [MASK]) serialise on the same rows: a `paper` step at batch 256 on an H200 spent half
    its time in one such scatter. The matmul costs 2 x tokens x vocab x width FLOPs (0.3 TFLOP
    at batch 256), well under a millisecond there, and much more than the scatter on a CPU.
    """
    if gradient not in ("scatter", "dense"):
        raise ValueError(f"Unknown embedding gradient {gradient!r}; use 'scatter' or 'dense'.")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError("Embedding ids must be integers.")
    (table,) = embed.promote_dtype((embed.embedding[...],), dtype=embed.dtype, inexact=False)
    take = _lookup_dense_grad if gradient == "dense" else (lambda t, i: jnp.take(t, i, axis=0))
    return take(table, ids)


def embedding(
    num: int, dim: int, names: tuple[str | None, str | None], common: Common, rngs: nnx.Rngs
) -> nnx.Embed:
    """Embedding table [num, dim] with N(0, std) init and logical names."""
    return nnx.Embed(
        num,
        dim,
        dtype=common.dtype,
        param_dtype=jnp.float32,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(common.init_std), names),
        rngs=rngs,
    )


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32 (two-pass variance), output in dtype."""

    def __init__(self, dim: int, common: Common):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=("embed",))
        self.eps = common.layer_norm_eps
        self.dtype = common.dtype

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


def _heads(x: Array, num_heads: int) -> Array:
    """[B, L, N*D] -> [B, L, N, D]."""
    x = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
    return constrain(x, HEADS)


def _merge_heads(x: Array) -> Array:
    """[B, L, N, D] -> [B, L, N*D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class SelfAttention(nnx.Module):
    """BERT self-attention sub-layer, post-LN: LN(x + dropout(out(MHA(x))))."""

    def __init__(self, dim: int, num_heads: int, common: Common, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"Width {dim} is not divisible by {num_heads} heads.")
        self.query = dense(dim, dim, ("embed", "heads"), common, rngs)
        self.key = dense(dim, dim, ("embed", "heads"), common, rngs)
        self.value = dense(dim, dim, ("embed", "heads"), common, rngs)
        self.out = dense(dim, dim, ("heads", "embed"), common, rngs)
        self.norm = LayerNorm(dim, common)
        self.num_heads = num_heads
        self.common = common

    def __call__(self, x: Array, bias: Array, dropout_key: Key = None) -> Array:
        attn_key, out_key = split_key(dropout_key, 2)
        q, k, v = (_heads(proj(x), self.num_heads) for proj in (self.query, self.key, self.value))
        ctx = dot_product_attention(
            q, k, v, bias, dropout_rate=self.common.attention_dropout_rate, dropout_key=attn_key,
            implementation=self.common.attention_impl,
        )
        y = dropout(self.out(_merge_heads(ctx)), self.common.dropout_rate, out_key)
        return constrain(self.norm(x + y), ACTIVATION)


class FeedForward(nnx.Module):
    """BERT feed-forward sub-layer, post-LN: LN(x + dropout(output(GELU(intermediate(x)))))."""

    def __init__(self, dim: int, mlp_dim: int, common: Common, rngs: nnx.Rngs):
        self.intermediate = dense(dim, mlp_dim, ("embed", "mlp"), common, rngs)
        self.output = dense(mlp_dim, dim, ("mlp", "embed"), common, rngs)
        self.norm = LayerNorm(dim, common)
        self.common = common

    def __call__(self, x: Array, dropout_key: Key = None) -> Array:
        y = self.output(gelu(self.intermediate(x)))
        y = dropout(y, self.common.dropout_rate, dropout_key)
        return constrain(self.norm(x + y), ACTIVATION)


class BertLayer(nnx.Module):
    """Post-LN transformer layer of the text and visual streams."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, common: Common, rngs: nnx.Rngs):
        self.attention = SelfAttention(dim, num_heads, common, rngs)
        self.ffn = FeedForward(dim, mlp_dim, common, rngs)

    def __call__(self, x: Array, bias: Array, dropout_key: Key = None) -> Array:
        attn_key, ffn_key = split_key(dropout_key, 2)
        return self.ffn(self.attention(x, bias, attn_key), ffn_key)


class CoAttentionLayer(nnx.Module):
    """ViLBERT-style bidirectional co-attention: each modality attends to the other only.

    Text queries attend to visual keys/values and vice versa (width `co_dim`, `num_heads` heads),
    each result goes through its own output projection, residual and LN, then each modality has
    its own post-LN feed-forward sub-layer.
    """

    def __init__(
        self,
        dim: int,
        co_dim: int,
        num_heads: int,
        text_mlp_dim: int,
        visual_mlp_dim: int,
        common: Common,
        rngs: nnx.Rngs,
    ):
        if co_dim % num_heads:
            raise ValueError(f"Co-attention width {co_dim} is not divisible by {num_heads} heads.")
        qkv = lambda: dense(dim, co_dim, ("embed", "heads"), common, rngs)  # noqa: E731
        self.visual_query, self.visual_key, self.visual_value = qkv(), qkv(), qkv()
        self.text_query, self.text_key, self.text_value = qkv(), qkv(), qkv()
        self.visual_out = dense(co_dim, dim, ("heads", "embed"), common, rngs)
        self.visual_norm = LayerNorm(dim, common)
        self.text_out = dense(co_dim, dim, ("heads", "embed"), common, rngs)
        self.text_norm = LayerNorm(dim, common)
        self.visual_ffn = FeedForward(dim, visual_mlp_dim, common, rngs)
        self.text_ffn = FeedForward(dim, text_mlp_dim, common, rngs)
        self.num_heads = num_heads
        self.common = common

    def __call__(
        self,
        text: Array,
        visual: Array,
        text_bias: Array,
        visual_bias: Array,
        dropout_key: Key = None,
    ) -> tuple[Array, Array]:
        keys = split_key(dropout_key, 6)
        heads = lambda proj, x: _heads(proj(x), self.num_heads)  # noqa: E731
        rate, attn_rate = self.common.dropout_rate, self.common.attention_dropout_rate
        # Text attends to visual (C1, text length) and visual attends to text (C2, visual length).
        text_ctx = dot_product_attention(
            heads(self.text_query, text),
            heads(self.visual_key, visual),
            heads(self.visual_value, visual),
            visual_bias,
            dropout_rate=attn_rate,
            dropout_key=keys[0],
            implementation=self.common.attention_impl,
        )
        visual_ctx = dot_product_attention(
            heads(self.visual_query, visual),
            heads(self.text_key, text),
            heads(self.text_value, text),
            text_bias,
            dropout_rate=attn_rate,
            dropout_key=keys[1],
            implementation=self.common.attention_impl,
        )
        visual_y = dropout(self.visual_out(_merge_heads(visual_ctx)), rate, keys[2])
        text_y = dropout(self.text_out(_merge_heads(text_ctx)), rate, keys[3])
        visual = constrain(self.visual_norm(visual + visual_y), ACTIVATION)
        text = constrain(self.text_norm(text + text_y), ACTIVATION)
        return self.text_ffn(text, keys[4]), self.visual_ffn(visual, keys[5])


class FusedSelfAttention(nnx.Module):
    """Multi-head self-attention with one fused q/k/v projection (PyTorch nn.MultiheadAttention).

    `in_proj` kernel is [dim, 3*dim], columns ordered q, k, v (the transposed `in_proj_weight`).
    No dropout: the reference joint encoder uses none inside attention.
    """

    def __init__(self, dim: int, num_heads: int, common: Common, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"Width {dim} is not divisible by {num_heads} heads.")
        self.in_proj = dense(dim, 3 * dim, ("embed", "heads"), common, rngs)
        self.out_proj = dense(dim, dim, ("heads", "embed"), common, rngs)
        self.num_heads = num_heads
        self.implementation = common.attention_impl

    def __call__(self, x: Array, bias: Array) -> Array:
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        q, k, v = (_heads(t, self.num_heads) for t in (q, k, v))
        ctx = dot_product_attention(q, k, v, bias, implementation=self.implementation)
        return self.out_proj(_merge_heads(ctx))


class JointBlock(nnx.Module):
    """Pre-LN CLIP residual block: x += MHA(LN(x)); x += mlp_out(QuickGELU(mlp_in(LN(x))))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, common: Common, rngs: nnx.Rngs):
        self.attention_norm = LayerNorm(dim, common)
        self.attention = FusedSelfAttention(dim, num_heads, common, rngs)
        self.mlp_norm = LayerNorm(dim, common)
        self.mlp_in = dense(dim, mlp_dim, ("embed", "mlp"), common, rngs)
        self.mlp_out = dense(mlp_dim, dim, ("mlp", "embed"), common, rngs)

    def __call__(self, x: Array, bias: Array) -> Array:
        x = constrain(x + self.attention(self.attention_norm(x), bias), ACTIVATION)
        x = x + self.mlp_out(quick_gelu(self.mlp_in(self.mlp_norm(x))))
        return constrain(x, ACTIVATION)


def run_stack(
    layers: Sequence[nnx.Module],
    x: Any,
    *args: Any,
    keys: Sequence[Key] | None = None,
    remat: bool = False,
) -> Any:
    """Applies `layers` in order, `x = layer(*x, *args[, key])`, each rematerialised if `remat`.

    `x` is an array or a tuple of arrays (unpacked into the layer's leading arguments); `keys`
    gives one dropout key per layer, or None for layers that take no key.
    """
    call = nnx.remat(lambda m, *a: m(*a)) if remat else (lambda m, *a: m(*a))
    for i, layer in enumerate(layers):
        inputs = (*(x if isinstance(x, tuple) else (x,)), *args)
        x = call(layer, *inputs) if keys is None else call(layer, *inputs, keys[i])
    return x
