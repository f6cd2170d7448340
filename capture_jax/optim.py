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

The update is one fused pass per parameter (`clipped_adamw`): the chain of optax transformations
computes the same numbers, but XLA materialises its intermediates (about eight passes over each
parameter-sized array); fused, a step reads the gradient, the parameter and the two moments and
writes the parameter and the moments, plus the read that gives the gradient norm. The state keeps
the chain's structure, so checkpoints written with either restore with the other. With
`bert_lr_multiplier != 1` the optax chain (`optax_chain`) runs: two learning rates need
multi_transform's state layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
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


def clipped_adamw(schedule: optax.Schedule, *, b1: float, b2: float, eps: float,
                  weight_decay: float, max_norm: float, mask=decay_mask
                  ) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with masked decoupled weight decay, one fused pass per
    parameter. Same numbers and state pytree as `optax.chain(optax.clip_by_global_norm(max_norm),
    optax.adamw(schedule, b1, b2, eps, weight_decay=weight_decay, mask=mask))`."""
    reference = optax.chain(optax.clip_by_global_norm(max_norm),
                            optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                                        weight_decay=weight_decay, mask=mask))

    def update(grads, state, params):
        if params is None:
            raise ValueError("clipped_adamw needs the parameters (weight decay): call "
                             "update(grads, state, params).")
        clip_state, (adam, masked, sched) = state
        g_norm = optax.tree.norm(grads)
        clip = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)  # A scalar, not a select.
        count = optax.safe_increment(adam.count)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        lr = schedule(sched.count)

        def leaf(g, m, v, p, decay):
            g = g * clip.astype(g.dtype)
            m = (1 - b1) * g + b1 * m
            v = (1 - b2) * g * g + b2 * v
            u = (m / c1) / (jnp.sqrt(v / c2) + eps)
            if decay:
                u = u + weight_decay * p
            return -lr * u, m, v

        out = jax.tree.map(leaf, grads, adam.mu, adam.nu, params, mask(params))
        part = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)
        new_state = (clip_state, (adam._replace(count=count, mu=part(1), nu=part(2)), masked,
                                  sched._replace(count=optax.safe_increment(sched.count))))
        return part(0), new_state

    return optax.GradientTransformation(reference.init, update)


def optax_chain(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    """The optimiser as a chain of optax transformations (any `bert_lr_multiplier`)."""
    opt = config.optim

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
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), update)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimiser for `config.optim` (see the module docstring)."""
    opt = config.optim
    schedule = learning_rate_schedule(config)
    if opt.bert_lr_multiplier == 1.0:
        tx = clipped_adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, max_norm=opt.grad_clip_norm)
    else:
        tx = optax_chain(config, schedule)
    if opt.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps)
    return tx
