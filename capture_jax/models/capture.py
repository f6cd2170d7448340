"""CAPTURE (Zhan et al., ICCV 2021) in Flax NNX: two single-modality streams, co-attention, a
joint encoder, contrastive poolers and MLM/MRM heads. docs/reference.md gives the exact shapes.

The visual front end (`config.visual.kind`: `regions` or `pixels`) is a class of
`frontends.py`; it turns the batch's visual inputs into regions and MRM targets.

Dropout: `model(batch, train=True, dropout_key=key)`. The key is an argument, not model state, so
the model can run inside a plain `jax.jit` over split/merged state and a trainer that passes
`jax.random.fold_in(root, step)` replays dropout exactly on resume. `train=False` is deterministic.

Reference bugs fixed here: the joint encoder's key-padding mask is per sample (the reference
tiles it across heads in the wrong order, so a head of one sample used another sample's padding);
the unused co-attention projections `q_dense1/2` and the unused joint pooler are left out.
`capture_jax/reference_names.py` maps the reference's tensor names to these parameters.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from capture_jax.models import frontends, layers
from capture_jax.models.layers import ACTIVATION, Common, dense, embedding, split_key
from capture_jax.sharding import constrain

Array = jax.Array
Batch = Mapping[str, Array]


def embedding_gradient(config: ml_collections.ConfigDict) -> str:
    """`config.embedding_grad` ('auto', 'scatter', 'dense'; see `layers.lookup`): 'auto' is
    'dense' on GPUs and TPUs and 'scatter' on CPUs."""
    grad = config.embedding_grad
    if grad == "auto":
        return "scatter" if jax.default_backend() == "cpu" else "dense"
    if grad not in ("scatter", "dense"):
        raise ValueError(f"Unknown embedding_grad {grad!r}; use 'auto', 'scatter' or 'dense'.")
    return grad


class TextEmbeddings(nnx.Module):
    """BERT embeddings: word + position + token type (all type 0), LN, dropout."""

    def __init__(self, config: ml_collections.ConfigDict, common: Common, rngs: nnx.Rngs):
        d = config.hidden_size
        self.word_embeddings = embedding(config.vocab_size, d, ("vocab", "embed"), common, rngs)
        self.position_embeddings = embedding(config.max_text_positions, d, (None, "embed"),
                                             common, rngs)
        self.token_type_embeddings = embedding(config.type_vocab_size, d, (None, "embed"),
                                               common, rngs)
        self.layer_norm = layers.LayerNorm(d, common)
        self.rate = common.dropout_rate
        self.gradient = embedding_gradient(config)

    def __call__(self, ids: Array, dropout_key: layers.Key) -> Array:
        if ids.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(f"Text length {ids.shape[1]} exceeds the "
                             f"{self.position_embeddings.num_embeddings} text positions.")
        positions = jnp.arange(ids.shape[1])[None, :]
        # Every token has type 0: one row, broadcast (its gradient is a sum, not a scatter-add
        # of every token into the same row).
        token_type = self.token_type_embeddings(jnp.zeros((1, 1), jnp.int32))
        x = (layers.lookup(self.word_embeddings, ids, self.gradient)
             + self.position_embeddings(positions) + token_type)
        return constrain(layers.dropout(self.layer_norm(x), self.rate, dropout_key), ACTIVATION)


class VisualEmbeddings(nnx.Module):
    """Region embeddings: Linear(feature) + Linear(5-d box), LN, dropout; no positions."""

    def __init__(self, feature_dim: int, d: int, common: Common, rngs: nnx.Rngs):
        self.feature_embeddings = dense(feature_dim, d, ("feature", "embed"), common, rngs)
        self.location_embeddings = dense(5, d, (None, "embed"), common, rngs)
        self.layer_norm = layers.LayerNorm(d, common)
        self.rate = common.dropout_rate

    def __call__(self, feats: Array, boxes: Array, dropout_key: layers.Key) -> Array:
        x = self.feature_embeddings(feats) + self.location_embeddings(boxes)
        return constrain(layers.dropout(self.layer_norm(x), self.rate, dropout_key), ACTIVATION)


class PredictionHead(nnx.Module):
    """BERT prediction head: dense, GELU, LN, then a decoder to `out` dims.

    `tied=True` (MLM): the decoder is the word-embedding table passed to `__call__`, plus an own
    bias; otherwise (MRM) an own Linear.
    """

    def __init__(self, d: int, out: int, common: Common, rngs: nnx.Rngs, *, tied: bool = False):
        self.dense = dense(d, d, ("embed", "mlp"), common, rngs)
        self.layer_norm = layers.LayerNorm(d, common)
        if tied:
            self.bias = nnx.Param(jnp.zeros((out,), jnp.float32), out_sharding=("vocab",))
        else:
            self.decoder = dense(d, out, ("embed", "feature"), common, rngs)

    def __call__(self, x: Array, tied: nnx.Embed | None = None) -> Array:
        h = self.layer_norm(layers.gelu(self.dense(x)))
        return self.decoder(h) if tied is None else tied.attend(h) + self.bias[...].astype(h.dtype)


class JointEncoder(nnx.Module):
    """Learned positions over [text; visual], dropout, then pre-LN blocks (no final LN)."""

    def __init__(self, config: ml_collections.ConfigDict, common: Common, rngs: nnx.Rngs):
        j, d = config.joint, config.hidden_size
        self.position_embeddings = embedding(j.max_positions, d, (None, "embed"), common, rngs)
        self.blocks = nnx.List([layers.JointBlock(d, j.num_heads, j.mlp_dim, common, rngs)
                                for _ in range(j.num_layers)])
        self.rate, self.remat = common.dropout_rate, j.remat

    def __call__(self, x: Array, mask: Array, dropout_key: layers.Key) -> Array:
        if x.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(f"Joint length {x.shape[1]} exceeds the "
                             f"{self.position_embeddings.num_embeddings} joint positions.")
        x = x + self.position_embeddings(jnp.arange(x.shape[1])[None, :])
        x = constrain(layers.dropout(x, self.rate, dropout_key), ACTIVATION)
        # Fixes reference bug 1: the key-padding mask is per sample, broadcast over heads.
        bias = layers.attention_bias(mask, layers.JOINT_MASK_VALUE)
        return layers.run_stack(self.blocks, x, bias, remat=self.remat)


def attention_implementation(config: ml_collections.ConfigDict) -> str | None:
    """`config.attention_impl` ('auto', 'xla' or 'cudnn') as `jax.nn.dot_product_attention`'s
    `implementation`, after checking that this backend and dtype can run it."""
    impl = config.attention_impl
    if impl not in ("auto", "xla", "cudnn"):
        raise ValueError(f"Unknown attention_impl {impl!r}; use 'auto', 'xla' or 'cudnn'.")
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU, and JAX runs on "
                         f"{jax.default_backend()!r} here: use --config.model.attention_impl=auto.")
    if impl == "cudnn" and jnp.dtype(config.dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl='cudnn' needs dtype bfloat16 (cuDNN's fused attention "
                         f"has no {config.dtype}): set --config.model.dtype=bfloat16 or "
                         "attention_impl=auto.")
    if impl == "cudnn" and config.attention_dropout_rate > 0:
        logging.log_first_n(
            logging.WARNING, "attention_impl='cudnn' is used where attention probabilities have "
            "no dropout (the joint encoder; everything in evaluation); with attention_dropout_rate "
            "%s the streams and co-attention train with attention written out. Set "
            "--config.model.attention_dropout_rate=0 for cuDNN there too.", 1,
            config.attention_dropout_rate)
    return None if impl == "auto" else impl


def mlm_positions(labels: Array, k: int) -> tuple[Array, Array]:
    """The first `k` MLM-selected positions of each row (labels >= 0), in order, [B, k'], and
    their labels, -1 in slots past a row's selections; k' = min(k, T). Static shapes."""
    k = min(k, labels.shape[1])
    unselected_first = (labels < 0).astype(jnp.int32)  # 0 = selected, sorted first (stable).
    positions = jnp.argsort(unselected_first, axis=1, stable=True)[:, :k]
    return positions, jnp.take_along_axis(labels, positions, axis=1)


class CaptureModel(nnx.Module):
    """CAPTURE; `__call__` for pretraining outputs, `embed` for retrieval features."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        c, d, v = config, config.hidden_size, config.visual
        front_end = frontends.get(v.kind)(c)
        common = Common(jnp.dtype(c.dtype), c.init_std, c.layer_norm_eps, c.dropout_rate,
                        c.attention_dropout_rate, attention_implementation(c))
        self.config, self.front_end = ml_collections.FrozenConfigDict(c), front_end
        self.visual_stem = front_end.make_stem(common, rngs)  # Its parameters, if any.
        self.text_embeddings = TextEmbeddings(c, common, rngs)
        self.visual_embeddings = VisualEmbeddings(front_end.feature_dim, d, common, rngs)
        self.text_layers = nnx.List([layers.BertLayer(d, c.text.num_heads, c.text.mlp_dim, common,
                                                      rngs) for _ in range(c.text.num_layers)])
        self.visual_layers = nnx.List([layers.BertLayer(d, v.num_heads, v.mlp_dim, common, rngs)
                                       for _ in range(v.num_layers)])
        self.text_pooler = dense(d, c.out_dim, ("embed", "mlp"), common, rngs)
        self.visual_pooler = dense(d, c.out_dim, ("embed", "mlp"), common, rngs)
        self.co_layers = nnx.List([
            layers.CoAttentionLayer(d, c.co.width, c.co.num_heads, c.text.mlp_dim, v.mlp_dim,
                                    common, rngs) for _ in range(c.co.num_layers)])
        self.joint = JointEncoder(c, common, rngs)
        self.text_out = dense(d, c.out_dim, ("embed", "mlp"), common, rngs)
        self.visual_out = dense(d, c.out_dim, ("embed", "mlp"), common, rngs)
        self.text_head_proj = dense(c.out_dim, d, ("mlp", "embed"), common, rngs)
        self.visual_head_proj = dense(c.out_dim, d, ("mlp", "embed"), common, rngs)
        self.mlm_head = PredictionHead(d, c.vocab_size, common, rngs, tied=True)
        self.mrm_head = PredictionHead(d, front_end.target_dim, common, rngs)

    def _encode(self, batch: Batch, dropout_key: layers.Key) -> dict[str, Array]:
        """Everything up to the joint outputs S_t, S_v (docs/reference.md, forward steps 1-6)."""
        c = self.config
        keys = split_key(dropout_key, 4)
        feats, boxes, visual_mask, targets = self.front_end.inputs(batch, self.visual_stem)
        text_mask = batch["text_mask"].astype(jnp.float32)
        text = self.text_embeddings(batch["text_ids"], keys[0])
        visual = self.visual_embeddings(feats, boxes, keys[1])
        text_bias = layers.attention_bias(text_mask, layers.STREAM_MASK_VALUE)
        visual_bias = layers.attention_bias(visual_mask, layers.STREAM_MASK_VALUE)
        stack_keys = split_key(keys[2], len(self.text_layers) + len(self.visual_layers)
                               + len(self.co_layers))
        n_t, n_v = len(self.text_layers), len(self.visual_layers)
        text = layers.run_stack(self.text_layers, text, text_bias, keys=stack_keys[:n_t],
                                remat=c.text.remat)
        visual = layers.run_stack(self.visual_layers, visual, visual_bias,
                                  keys=stack_keys[n_t:n_t + n_v], remat=c.visual.remat)
        text_first, visual_first = text[:, 0], visual[:, 0]  # Single-stream first tokens.
        clr_text = jax.nn.relu(self.text_pooler(text_first))
        clr_visual = jax.nn.relu(self.visual_pooler(visual_first))
        text, visual = layers.run_stack(self.co_layers, (text, visual), text_bias, visual_bias,
                                        keys=stack_keys[n_t + n_v:], remat=c.co.remat)
        joint = self.joint(jnp.concatenate([text, visual], axis=1),
                           jnp.concatenate([text_mask, visual_mask], axis=1), keys[3])
        t_len = text.shape[1]
        s_text = jax.nn.relu(self.text_out(joint[:, :t_len]))
        s_visual = jax.nn.relu(self.visual_out(joint[:, t_len:]))
        return dict(s_text=s_text, s_visual=s_visual, clr_text=clr_text, clr_visual=clr_visual,
                    mrm_targets=targets, stream_text=text_first, stream_visual=visual_first)

    def __call__(self, batch: Batch, *, train: bool,
                 dropout_key: jax.Array | None = None) -> dict[str, Array]:
        """Pretraining outputs. `dropout_key` is required when `train` and dropout is on.

        Returns `pooled_text`, `pooled_visual` [B, out_dim] (joint outputs at token 0),
        `clr_text`, `clr_visual` [B, out_dim] (pre-fusion contrastive features), `mlm_logits`
        [B, T, vocab], `mrm_pred` and `mrm_targets` [B, R, target_dim] (global token excluded).
        With `config.mlm_max_predictions` = K > 0 the MLM head runs only at the first K selected
        positions of each row (`batch["mlm_labels"]` >= 0): `mlm_logits` is [B, K, vocab] and
        `mlm_labels` [B, K] holds their labels (-1 in unused slots); later selections in a row
        are not scored.
        """
        needs_key = self.config.dropout_rate > 0 or self.config.attention_dropout_rate > 0
        if train and needs_key and dropout_key is None:
            raise ValueError("Training with dropout needs a dropout_key, e.g. "
                             "jax.random.fold_in(root_key, step).")
        enc = self._encode(batch, dropout_key if train else None)
        s_text, s_visual = enc.pop("s_text"), enc.pop("s_visual")
        del enc["stream_text"], enc["stream_visual"]  # Retrieval features only (`embed`).
        mlm_inputs, extra = s_text, {}
        if self.config.mlm_max_predictions > 0:
            if "mlm_labels" not in batch:
                raise ValueError("model.mlm_max_predictions > 0 needs batch['mlm_labels'] to find "
                                 "the selected positions; set it to 0 for logits everywhere.")
            positions, extra["mlm_labels"] = mlm_positions(batch["mlm_labels"],
                                                           self.config.mlm_max_predictions)
            mlm_inputs = jnp.take_along_axis(s_text, positions[..., None], axis=1)
        mlm_logits = self.mlm_head(self.text_head_proj(mlm_inputs),
                                   self.text_embeddings.word_embeddings)
        mrm_pred = self.mrm_head(self.visual_head_proj(s_visual[:, 1:]))
        return dict(enc, **extra, pooled_text=s_text[:, 0], pooled_visual=s_visual[:, 0],
                    mlm_logits=mlm_logits, mrm_pred=mrm_pred)

    def embed(self, batch: Batch) -> dict[str, Array]:
        """Retrieval features by kind (`FEATURE_KINDS`), deterministic, no training heads."""
        enc = self._encode(batch, None)
        # The mean input embedding of the title's own tokens ([CLS], [SEP], padding left out).
        ids, mask = batch["text_ids"], batch["text_mask"].astype(jnp.float32)
        last = jnp.arange(ids.shape[1])[None] == mask.sum(1, keepdims=True) - 1
        tokens = mask * (jnp.arange(ids.shape[1])[None] > 0) * (1.0 - last)
        words = self.text_embeddings.word_embeddings(ids).astype(jnp.float32)
        title = (words * tokens[..., None]).sum(1) / jnp.maximum(tokens.sum(1), 1.0)[:, None]
        return retrieval_features(enc["s_text"][:, 0], enc["s_visual"][:, 0], enc["clr_text"],
                                  enc["clr_visual"], enc["stream_text"], enc["stream_visual"],
                                  title)


# What each retrieval feature kind is; `CaptureModel.embed` returns them all.
FEATURE_KINDS = {
    "joint": "concat(L2(visual), L2(text)) of the joint encoder's first tokens (EGE's recipe)",
    "visual": "the joint encoder's visual first token, S_v[:, 0]",
    "text": "the joint encoder's text first token, S_t[:, 0]",
    "clr_visual": "the pre-fusion visual feature that CLR trains, f_v",
    "clr_text": "the pre-fusion text feature that CLR trains, f_t",
    "clr_concat": "concat(L2(f_v), L2(f_t))",
    "capture": "concat(L2(S_t[:, 0] * S_v[:, 0]), L2(h_t[:, 0] * h_v[:, 0])): the joint and the "
               "single-stream first tokens multiplied across modalities (the authors' answer in "
               "zhanxlin/Product1M issue #5)",
    "prefusion": "concat(L2(f_v), L2(f_t), 1.5 L2(h_t[:, 0]), 2 L2(mean word embedding of the "
                 "title)): everything before fusion, text-weighted (docs/retrieval.md)",
}
# Weights of `prefusion`'s parts (f_v, f_t, h_t, title embedding), chosen on the seed-0 `demo`
# run's dev queries among 1-3 (docs/retrieval.md has the sweep).
PREFUSION_WEIGHTS = (1.0, 1.0, 1.5, 2.0)


def retrieval_features(s_text: Array, s_visual: Array, clr_text: Array, clr_visual: Array,
                       stream_text: Array, stream_visual: Array, title: Array
                       ) -> dict[str, Array]:
    """Every kind of `FEATURE_KINDS` from the first-token outputs and the title embedding,
    float32 [B, D_kind]."""
    norm = layers.l2_normalize
    f = dict(visual=s_visual, text=s_text, clr_visual=clr_visual, clr_text=clr_text)
    f = {k: v.astype(jnp.float32) for k, v in f.items()}
    f["joint"] = jnp.concatenate([norm(f["visual"]), norm(f["text"])], axis=-1)
    f["clr_concat"] = jnp.concatenate([norm(f["clr_visual"]), norm(f["clr_text"])], axis=-1)
    single = stream_text.astype(jnp.float32) * stream_visual.astype(jnp.float32)
    f["capture"] = jnp.concatenate([norm(f["text"] * f["visual"]), norm(single)], axis=-1)
    parts = (f["clr_visual"], f["clr_text"], stream_text.astype(jnp.float32), title)
    f["prefusion"] = jnp.concatenate([w * norm(x) for w, x in zip(PREFUSION_WEIGHTS, parts)], -1)
    return {k: f[k] for k in FEATURE_KINDS}
