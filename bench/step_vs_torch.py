"""Our `paper` train step against the CAPTURE reference model in PyTorch, side by side (float32).

    PYTHONPATH=/path/to/torch python bench/step_vs_torch.py [--batch_sizes 4,8] [--repeats 5]
        [--nocheck] [--torch_adamw default|foreach|fused]

Needs PyTorch (the CPU wheel) besides the project's requirements; `bench/torch_reference.py` is
the reference model. One process, both frameworks, this machine's CPUs:

* `step_vs_torch_check` (one JSON line, skipped by `--nocheck`): the two are the same model. Our
  `paper` model in float32 is exported with `convert.params_to_reference` and loaded into the
  PyTorch model with `strict=True`; on one batch with text and region padding and fixed MLM/MRM
  selections, both run without dropout (`train=False` / `eval()`). It prints each loss of both,
  the largest output differences and the worst per-tensor gradient difference (by reference name).
* `step_vs_torch` (one JSON line per batch size; `--batch_sizes=` skips them): both start from the
  same weights and run the same random batch (titles padded to 8-36 tokens, 15% MLM/MRM selections)
  in training mode with `paper`'s dropout (0.1 hidden, 0.1 on attention probabilities). Ours is the
  real jitted `train_state.make_train_step` (forward, three losses, backward, clipping, AdamW, grad
  and param norms), compiled ahead; PyTorch's is `torch_reference.train_step` (the same work with
  `torch.optim.AdamW` at our schedule's learning rate, and `clip_grad_norm_`). After two warm-up
  steps each, `--repeats` rounds of one step of each, alternating which goes first; medians count,
  `ratio` = our examples/s over PyTorch's. The optimiser alone is timed the same way: ours a jitted
  `optim.create_optimizer(config)` update of donated parameters and state with fixed gradients,
  plus both norms; PyTorch's clip + AdamW step + norms on the gradients of its last step.

PyTorch runs on os.cpu_count() threads, XLA at its defaults.
"""

import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import torch
except ImportError:
    raise SystemExit("bench/step_vs_torch.py needs PyTorch: pip install torch (the CPU wheel), "
                     "or put an installation on PYTHONPATH.") from None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import flags, logging  # noqa: E402
from flax import nnx  # noqa: E402

import torch_reference  # noqa: E402  (bench/)
from common import interleaved, random_batch, update_with_norms  # noqa: E402  (bench/)
from capture_jax import cli, convert, losses, optim, sharding, train_state  # noqa: E402
from configs import capture as capture_configs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["4", "8"], "Batch sizes to time (empty: the check only).")
flags.DEFINE_integer("repeats", 5, "Timed rounds (one step of each) per batch size.")
flags.DEFINE_bool("check", True, "First check that both give the same losses and gradients.")
flags.DEFINE_enum("torch_adamw", "default", ["default", "foreach", "fused"],
                  "torch.optim.AdamW implementation; default: PyTorch's choice (for-loop on CPU).")


def padded_batch(model_config, batch_size: int = 4) -> dict[str, np.ndarray]:
    """`random_batch` with different text lengths and region counts per row (zero padding)."""
    batch = random_batch(model_config, batch_size, seed=1)
    t, r = batch["text_ids"].shape[1], batch["visual_feats"].shape[1]
    text_len = np.linspace(t, 6, batch_size).astype(int)
    regions = np.linspace(r, 3, batch_size).astype(int)
    text_real = np.arange(t)[None] < text_len[:, None]
    region_real = np.arange(r)[None] < regions[:, None]
    batch["text_mask"] = text_real.astype(np.int32)
    batch["text_ids"] = np.where(text_real, batch["text_ids"], 0).astype(np.int32)
    selectable = text_real & (np.arange(t)[None] > 0)  # never [CLS] or padding
    batch["mlm_labels"] = np.where(selectable, batch["mlm_labels"], -1).astype(np.int32)
    batch["visual_mask"] = region_real.astype(np.int32)
    batch["visual_boxes"] = np.abs(batch["visual_boxes"]) % 1.0 * region_real[..., None]
    batch["visual_feats"] = batch["visual_feats"] * region_real[..., None]
    for key in ("mrm_mask", "mrm_zero"):
        batch[key] = (batch[key] * region_real).astype(np.int32)
    return batch


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def load_ours(torch_model: torch.nn.Module, model_state, config) -> None:
    """Our parameters into the PyTorch model, every reference name present (strict)."""
    state_dict = convert.params_to_reference(model_state, config.model)
    torch_model.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()},
                                strict=True)


def max_diff(ours, theirs) -> tuple[float, float]:
    """(max |ours - theirs|, that / max |theirs|)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    diff = float(np.abs(ours - theirs).max())
    return diff, diff / max(float(np.abs(theirs).max()), 1e-30)


def check(config, state, torch_model) -> dict:
    """Losses, outputs and gradients of both models, no dropout, on one padded batch."""
    batch = padded_batch(config.model)

    def loss_fn(model_state, batch):
        outputs = nnx.merge(state.model_def, model_state)(batch, train=False)
        total, parts = losses.compute_losses(outputs, batch, config)
        return total, (parts, outputs)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (total, (parts, outputs)), grads = grad_fn(state.model, batch)
    torch_model.eval()
    torch_model.zero_grad(set_to_none=True)
    t_outputs = torch_model(to_torch(batch))
    t_total, t_parts = torch_reference.compute_losses(t_outputs, to_torch(batch))
    t_total.backward()

    result = {"bench": "step_vs_torch_check", "batch": len(batch["text_ids"]),
              "text_lengths": batch["text_mask"].sum(1).tolist(),
              "regions": batch["visual_mask"].sum(1).tolist()}
    for name, ours, theirs in [("loss", total, t_total),
                               *((k, parts[k], t_parts[k]) for k in parts)]:
        ours, theirs = float(ours), float(theirs.detach())
        result[f"{name}_ours"], result[f"{name}_torch"] = round(ours, 6), round(theirs, 6)
        result[f"{name}_rel_diff"] = float(f"{abs(ours - theirs) / abs(theirs):.2e}")
    for key in ("mlm_logits", "mrm_pred", "clr_text", "clr_visual", "pooled_text",
                "pooled_visual"):
        abs_diff, rel_diff = max_diff(outputs[key], t_outputs[key].detach().numpy())
        result[f"{key}_max_abs_diff"] = float(f"{abs_diff:.2e}")
        result[f"{key}_max_rel_diff"] = float(f"{rel_diff:.2e}")
    # Gradients by reference name, ||ours - theirs|| / ||theirs|| per tensor (the worst one), and
    # over all. Key biases are compared apart: their exact gradient is 0 (softmax is invariant to
    # a shift per query), so both sides hold rounding noise only.
    our_grads = convert.params_to_reference(grads, config.model)
    diff_sq, total_sq, worst, worst_name, key_bias_max = 0.0, 0.0, 0.0, "", 0.0
    for name, param in torch_model.named_parameters():
        theirs = param.grad.double().numpy()
        diff = our_grads[name] - theirs
        if re.search(r"\.key\d?\.bias$", name):
            key_bias_max = max(key_bias_max, float(np.abs(our_grads[name]).max()),
                               float(np.abs(theirs).max()))
            continue
        diff_sq, total_sq = diff_sq + np.sum(diff**2), total_sq + np.sum(theirs**2)
        err = float(np.linalg.norm(diff) / max(np.linalg.norm(theirs), 1e-30))
        if err > worst:
            worst, worst_name = err, name
    t_norm = float(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in torch_model.parameters()])))
    ours_norm = float(optax.tree.norm(grads))
    result.update(grad_norm_ours=round(ours_norm, 6), grad_norm_torch=round(t_norm, 6),
                  grad_norm_rel_diff=float(f"{abs(ours_norm - t_norm) / t_norm:.2e}"),
                  grad_rel_diff_all=float(f"{np.sqrt(diff_sq / total_sq):.2e}"),
                  worst_grad_rel_diff=float(f"{worst:.2e}"), worst_grad_tensor=worst_name,
                  key_bias_grad_max_abs=float(f"{key_bias_max:.2e}"),
                  grad_tensors=len(list(torch_model.parameters())))
    torch_model.zero_grad(set_to_none=True)
    return result


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    logging.set_verbosity(logging.WARNING)
    try:
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    except ValueError as e:
        cli.usage_error(f"--batch_sizes takes integers ({e})", cli.USAGE_STATUS)
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = capture_configs.get_config("paper")
    config.model.dtype = "float32"
    mesh, rules = sharding.make_mesh({"data": -1}), sharding.rules("dp")
    tx = optim.create_optimizer(config)
    schedule, torch_steps = optim.learning_rate_schedule(config), [0]
    torch_model = torch_reference.CaptureReference(
        torch_reference.ReferenceConfig.from_model_config(config.model))
    adamw = {"default": {}, "foreach": dict(foreach=True), "fused": dict(fused=True)}
    torch_opt = torch_reference.make_optimizer(torch_model, **adamw[FLAGS.torch_adamw])
    env = dict(dtype="float32", torch_threads=torch.get_num_threads(),
               torch_adamw=FLAGS.torch_adamw, cpu_count=os.cpu_count(), jax=jax.__version__,
               torch=torch.__version__, device=f"{jax.device_count()} x "
               f"{jax.devices()[0].device_kind}")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = train_state.create_train_state(
            config, tx, train_state.train_state_shapes(config, mesh, rules, tx))
        load_ours(torch_model, state.model, config)
        if FLAGS.check:
            print(json.dumps(check(config, state, torch_model)), flush=True)
        if not batch_sizes:
            return
        # The optimiser alone: ours (optim.create_optimizer) on a copy of the parameters, fixed
        # gradients.
        params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(
            nnx.merge(state.model_def, state.model), nnx.Param)))
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

        opt_fn = jax.jit(update_with_norms(tx), donate_argnums=(0, 1))
        ours_opt = [params, tx.init(params)]

        def our_opt_step():
            ours_opt[0], ours_opt[1], *norms = opt_fn(*ours_opt, grads)
            jax.block_until_ready(norms)

        def torch_opt_step():
            torch_reference.optimizer_update(torch_model, torch_opt)

        model_state, opt_state = state.model, state.opt
        batch_sh = sharding.batch_sharding(mesh, rules)
        for b in batch_sizes:
            batch = random_batch(config.model, b)
            jax_batch, torch_batch = jax.device_put(batch, batch_sh), to_torch(batch)
            load_ours(torch_model, model_state, config)  # the same weights at the start
            torch_model.train()
            start = time.perf_counter()
            step_fn = train_state.make_train_step(config, state, batch_sh, mesh)
            step_fn = step_fn.lower(model_state, opt_state, jax_batch, 0).compile()
            compile_s = time.perf_counter() - start
            step, metrics, t_metrics = [0], {}, {}

            def our_step():
                nonlocal model_state, opt_state, metrics
                model_state, opt_state, metrics = step_fn(model_state, opt_state, jax_batch,
                                                          step[0])
                jax.block_until_ready(metrics)
                step[0] += 1

            def torch_step():  # The learning rate of our schedule at PyTorch's step count.
                lr = float(schedule(torch_steps[0]))
                for group in torch_opt.param_groups:
                    group["lr"] = lr
                t_metrics.update(torch_reference.train_step(torch_model, torch_opt, torch_batch))
                torch_steps[0] += 1

            for fn in (our_step, torch_step, our_opt_step, torch_opt_step) * 2:  # warm-up
                fn()
            ours_s, torch_s = interleaved(
                FLAGS.repeats, {"ours": our_step, "torch": torch_step}).values()
            ours_opt_s, torch_opt_s = interleaved(
                FLAGS.repeats, {"ours": our_opt_step, "torch": torch_opt_step}).values()
            ours_med, torch_med = statistics.median(ours_s), statistics.median(torch_s)
            print(json.dumps({
                "bench": "step_vs_torch", "batch": b,
                "ours_step_s": round(ours_med, 4), "torch_step_s": round(torch_med, 4),
                "ours_examples_per_s": round(b / ours_med, 3),
                "torch_examples_per_s": round(b / torch_med, 3),
                "ratio": round(torch_med / ours_med, 3),
                "ours_optimizer_s": round(statistics.median(ours_opt_s), 4),
                "torch_optimizer_s": round(statistics.median(torch_opt_s), 4),
                "ours_step_times": [round(t, 3) for t in ours_s],
                "torch_step_times": [round(t, 3) for t in torch_s],
                "ours_loss": round(float(metrics["loss"]), 4),
                "torch_loss": round(float(t_metrics["loss"]), 4),
                "compile_s": round(compile_s, 1), "repeats": FLAGS.repeats, **env,
            }), flush=True)


if __name__ == "__main__":
    cli.run(main)
