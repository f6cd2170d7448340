"""CAPTURE's pretraining objectives: MLM, MRM and CLR, each switchable, summed with weights.

All reductions are float32 and over the global batch: under `jax.jit` on a sharded batch the
arrays are global, so a mean is the global mean and CLR's negatives come from every device (the
reference computed CLR per GPU replica, bug 4 in docs/reference.md). Empty selections give a zero
loss, never NaN.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from capture_jax.models.layers import l2_normalize

Array = jax.Array


def mlm_loss(logits: Array, labels: Array) -> Array:
    """Mean cross-entropy over positions with `labels >= 0` (labels -1 elsewhere)."""
    selected = labels >= 0
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(selected, labels, 0)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    count = selected.sum().astype(jnp.float32)
    return jnp.where(selected, nll, 0.0).sum() / jnp.maximum(count, 1.0)


def mrm_loss(pred: Array, target: Array, mask: Array) -> Array:
    """Mean squared error over selected regions (mask [B, R] = 1) x feature dims."""
    sel = mask.astype(jnp.float32)[..., None]
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)) * sel
    count = sel.sum() * pred.shape[-1]
    return err.sum() / jnp.maximum(count, 1.0)


def clr_loss(text: Array, visual: Array, temperature: float) -> Array:
    """InfoNCE over the 2B rows z = normalize([visual; text]) (NT-Xent).

    Each row's positive is its pair from the other modality; its negatives are the other 2B - 2
    rows of both modalities (itself excluded). Logits are cosine / temperature.
    """
    b = text.shape[0]
    z = l2_normalize(jnp.concatenate([visual, text], axis=0))  # float32
    logits = (z @ z.T) / temperature
    logits = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, logits)
    positives = jnp.concatenate([jnp.arange(b) + b, jnp.arange(b)])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, positives[:, None], axis=-1).mean()


def compute_losses(
    outputs: Mapping[str, Array], batch: Mapping[str, Array], config: ml_collections.ConfigDict,
    step: Array | int = 0,
) -> tuple[Array, dict[str, Array]]:
    """Weighted sum of the enabled objectives, and each (unweighted) component by name.

    `outputs` is `CaptureModel.__call__`'s dict; `batch` supplies `mlm_labels` and `mrm_mask`
    (the model's own `mlm_labels` when it computed MLM logits at selected positions only);
    `config.loss` holds the switches and weights (configs/capture.py); `step` (the optimiser
    step) matters only with `clr_warmup_steps`.
    """
    cfg = config.loss
    components: dict[str, Array] = {}
    weights: dict[str, float] = {}
    if cfg.use_mlm:
        labels = outputs["mlm_labels"] if "mlm_labels" in outputs else batch["mlm_labels"]
        components["mlm"] = mlm_loss(outputs["mlm_logits"], labels)
        weights["mlm"] = cfg.mlm_weight
    if cfg.use_mrm:
        if "mrm_mask" not in batch:
            raise ValueError("MRM is on (config.loss.use_mrm) but the batch has no 'mrm_mask'.")
        components["mrm"] = mrm_loss(outputs["mrm_pred"], outputs["mrm_targets"], batch["mrm_mask"])
        weights["mrm"] = cfg.mrm_weight
    if cfg.use_clr:
        components["clr"] = clr_loss(outputs["clr_text"], outputs["clr_visual"],
                                     cfg.clr_temperature)
        weights["clr"] = cfg.clr_weight
    if not components:
        raise ValueError("Every objective is off; enable one of config.loss.use_{mlm,mrm,clr}.")
    if cfg.use_clr and cfg.clr_warmup_steps > 0:
        after = (jnp.asarray(step) >= cfg.clr_warmup_steps).astype(jnp.float32)
        weights = {k: w if k == "clr" else w * after for k, w in weights.items()}
    total = sum(weights[k] * v for k, v in components.items())
    return total, components
