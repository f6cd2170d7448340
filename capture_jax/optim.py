"""The pretraining optimiser: AdamW as the CAPTURE reference configures it, with its bugs fixed.

* Learning rate: linear warm-up over the first `warmup_fraction` of the steps, then linear decay
  to 0 at `num_train_steps`.
* AdamW (beta 0.9/0.999, eps 1e-6) with decoupled weight decay 0.01 on matrices and embeddings
  only. The reference run inverts the groups (decays biases and LayerNorm, not matrices); here
  biases and LayerNorm parameters are never decayed (reference bug 2).
* Global-norm clipping at 1.0 over all parameters, before the update.
* Optional 0.1x learning rate for weights initialised from BERT (`bert_lr_multiplier`): the
  reference configures it but never applies it (reference bug 5), so it is off (1.0) by default.
* Optional gradient accumulation over `grad_accum_steps` micro-batches (optax.MultiSteps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to `optim.learning_rate`, then linear decay to 0 at `num_train_steps`."""
    total = config.num_train_steps
    warmup = int(config.optim.warmup_fraction * total)
    peak = config.optim.learning_rate
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)),
         optax.linear_schedule(peak, 0.0, max(total - warmup, 1))],
        boundaries=[warmup],
    )


def decay_mask(params):
    """True for matrices and embeddings (ndim >= 2); False for biases and LayerNorm (1-D)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def bert_labeler(prefixes: Sequence[str]) -> Callable:
    """Labels each parameter 'bert' if its path ('a/b/0/kernel') starts with a prefix, else 'rest'."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: ("bert" if jax.tree_util.keystr(path, simple=True, separator="/")
                             .startswith(tuple(prefixes)) else "rest"),
            params,
        )

    return labels


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax chain for `config.optim` (see the module docstring)."""
    opt = config.optim
    schedule = learning_rate_schedule(config)

    def adamw(scale: float) -> optax.GradientTransformation:
        lr = schedule if scale == 1.0 else (lambda step: scale * schedule(step))
        return optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=decay_mask)

    if opt.bert_lr_multiplier == 1.0:
        update = adamw(1.0)
    else:
        update = optax.multi_transform(
            {"bert": adamw(opt.bert_lr_multiplier), "rest": adamw(1.0)},
            bert_labeler(opt.bert_param_prefixes),
        )
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), update)
    if opt.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps)
    return tx
