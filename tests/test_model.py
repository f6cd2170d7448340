"""CaptureModel: parameter count, reference name table, shapes/dtypes, masking, invariances."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from capture_jax import losses, reference_names
from capture_jax.models import capture, cost
from capture_jax.models import frontends
from configs import capture as capture_configs
from fake_batches import FAST_COMPILE, build, make_batch, tiny_config

PAPER_PARAMS = 148_192_136
# paper_pixels: the region feature input (2048 -> 768) becomes a 768-d patch (16*16*3), and the
# MRM decoder predicts 768 pixels instead of 2048 features.
PAPER_PIXELS_PARAMS = PAPER_PARAMS - 2 * (2048 - 768) * 768 - (2048 - 768)
REFERENCE_TSV = pathlib.Path(__file__).with_name("reference_state_dict.tsv")  # copy of shared/
UNUSED_REFERENCE_PARAMS = 3_744_000  # docs/reference.md: tensors that never receive a gradient


def abstract_params(name: str) -> dict[str, tuple[int, ...]]:
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: capture.CaptureModel(
            capture_configs.get_config(name).model, rngs=nnx.Rngs(0)))
    return {".".join(map(str, path)): tuple(v.shape)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_parameter_counts():
    counts = {name: sum(int(np.prod(s)) for s in abstract_params(name).values())
              for name in ("paper", "paper_pixels")}
    print("parameter counts:", counts)
    assert counts == {"paper": PAPER_PARAMS, "paper_pixels": PAPER_PIXELS_PARAMS}


def test_reference_state_dict_maps_one_to_one():
    params = abstract_params("paper")
    table = reference_names.reference_name_table(capture_configs.get_config("paper").model)
    rows = [line.split("\t") for line in REFERENCE_TSV.read_text().splitlines()[1:] if line]
    assert len(rows) == 384
    covered, unused = [], 0
    for name, shape_text in rows:
        shape = tuple(int(d) for d in shape_text.split("x"))
        if name in reference_names.TIED_REFERENCE_TENSORS:
            assert shape == params["text_embeddings.word_embeddings.embedding"]
            continue
        if reference_names.UNUSED_REFERENCE_TENSORS.match(name):
            unused += int(np.prod(shape))
            continue
        assert name in table, f"reference tensor {name} has no entry in the name table"
        path, transpose = table[name]
        assert path in params, f"{name} -> {path}: no such parameter"
        assert params[path] == (shape[::-1] if transpose else shape), (name, path)
        covered.append(path)
    assert unused == UNUSED_REFERENCE_PARAMS
    assert len(covered) == len(set(covered)), "two reference tensors map onto one parameter"
    assert set(covered) == set(params), f"parameters not covered: {set(params) - set(covered)}"
    assert set(table) <= {name for name, _ in rows}


@pytest.mark.parametrize("kind", ["regions", "pixels"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shapes_and_dtypes(kind, dtype):
    config = tiny_config(kind, dtype, **({"visual": {"stem_channels": 8}} if dtype == "bfloat16"
                                          and kind == "pixels" else {}))
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: capture.CaptureModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    batch = make_batch(config, batch_size=3)
    b, t, d, dt = 3, config.text.length, config.out_dim, jnp.dtype(dtype)
    r, f = ((config.visual.num_regions, config.visual.feature_dim) if kind == "regions"
            else ((config.visual.image_size // config.visual.patch_size) ** 2,
                  config.visual.patch_size**2 * 3))
    out = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(
        batch, train=True, dropout_key=jax.random.key(0)), state)
    expected = dict(pooled_text=((b, d), dt), pooled_visual=((b, d), dt), clr_text=((b, d), dt),
                    clr_visual=((b, d), dt), mlm_logits=((b, t, config.vocab_size), dt),
                    mrm_pred=((b, r, f), dt), mrm_targets=((b, r, f), jnp.float32))
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == expected
    emb = jax.eval_shape(lambda s: nnx.merge(graphdef, s).embed(batch), state)
    f32, h = jnp.float32, config.hidden_size
    assert {k: (v.shape, v.dtype) for k, v in emb.items()} == dict(
        visual=((b, d), f32), text=((b, d), f32), joint=((b, 2 * d), f32),
        clr_visual=((b, d), f32), clr_text=((b, d), f32), clr_concat=((b, 2 * d), f32),
        capture=((b, d + h), f32), prefusion=((b, 2 * d + 2 * h), f32))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert var.dtype == jnp.float32 and names is not None and len(names) == var.ndim, path


def jitted(model):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b, train=False),
                      compiler_options=FAST_COMPILE)
    return lambda batch: jax.tree.map(np.asarray, forward(state, batch))


@pytest.fixture(scope="module")
def tiny_regions():
    """The tiny regions model and its jitted eval forward pass, shared to compile less."""
    config = tiny_config("regions")
    model = build(config)
    return config, model, jitted(model)


def test_batch_composition_and_padding_invariance(tiny_regions):
    """A sample's outputs do not depend on the rest of its batch nor on its padding content."""
    config, _, forward = tiny_regions
    batch = make_batch(config, batch_size=4, padded=True)
    assert batch["text_mask"].min() == 0 and batch["visual_mask"].min() == 0
    full = forward(batch)
    for i in range(4):
        alone = forward({k: v[i:i + 1] for k, v in batch.items()})
        for key in full:
            np.testing.assert_allclose(full[key][i:i + 1], alone[key], atol=1e-5, err_msg=key)
    noisy = dict(batch)
    rng = np.random.default_rng(1)
    noisy["text_ids"] = np.where(batch["text_mask"] == 1, batch["text_ids"],
                                 rng.integers(5, config.vocab_size, batch["text_ids"].shape))
    pad = (batch["visual_mask"] == 0)[..., None]
    noisy["visual_feats"] = np.where(pad, rng.normal(size=pad.shape), batch["visual_feats"])
    noisy["visual_boxes"] = np.where(pad, rng.uniform(size=pad.shape), batch["visual_boxes"])
    noisy = jax.tree.map(lambda x: x.astype(batch_dtype(x)), noisy)
    changed = forward(noisy)
    for key in ("pooled_text", "pooled_visual", "clr_text", "clr_visual"):
        np.testing.assert_allclose(full[key], changed[key], atol=1e-5, err_msg=key)


def batch_dtype(x):
    return np.float32 if np.issubdtype(x.dtype, np.floating) else np.int32


def test_mrm_zeroing_happens_before_the_global_token(tiny_regions):
    config, _, forward = tiny_regions
    batch = make_batch(config, batch_size=4, seed=5)
    assert batch["mrm_zero"].sum() > 0
    masked = forward(batch)
    zeroed = dict(batch, mrm_zero=np.zeros_like(batch["mrm_zero"]),
                  visual_feats=batch["visual_feats"] * (1 - batch["mrm_zero"])[..., None])
    explicit = forward(zeroed)
    for key in ("pooled_visual", "clr_visual", "mrm_pred", "mlm_logits"):
        np.testing.assert_allclose(masked[key], explicit[key], atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(masked["mrm_targets"], batch["visual_feats"])


def test_pixels_front_end():
    images = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
    patches = np.asarray(frontends.patchify(jnp.asarray(images), 4))
    assert patches.shape == (2, 6, 48)
    np.testing.assert_array_equal(patches[1, 4], images[1, 4:8, 4:8].reshape(-1))  # row 1, col 1
    boxes = np.asarray(frontends.grid_boxes(2, 3))
    np.testing.assert_allclose(boxes[4], [1 / 3, 1 / 2, 2 / 3, 1.0, 1 / 6], atol=1e-7)
    with pytest.raises(ValueError, match="not divisible"):
        frontends.patchify(jnp.zeros((1, 10, 8, 3)), 4)
    config = tiny_config("pixels")
    batch = make_batch(config, batch_size=2)
    out = jitted(build(config))(batch)
    raw = np.asarray(frontends.patchify(jnp.asarray(batch["image"]), config.visual.patch_size))
    expected = (raw - raw.mean(-1, keepdims=True)) / np.sqrt(raw.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out["mrm_targets"], expected, atol=1e-4)
    assert all(np.isfinite(v).all() for v in out.values())


def test_dropout_key_contract(tiny_regions):
    config, model, forward_eval = tiny_regions
    batch = make_batch(config, batch_size=4, seed=6)
    with pytest.raises(ValueError, match="dropout_key"):
        model(batch, train=True)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, b, k: nnx.merge(graphdef, s)(b, train=True, dropout_key=k),
                      compiler_options=FAST_COMPILE)
    # 'rbg' keys only to compile faster on CPU; the contract is the same for any key type.
    first, again, other = (forward(state, batch, jax.random.key(s, impl="rbg")) for s in (3, 3, 4))
    np.testing.assert_array_equal(first["pooled_text"], again["pooled_text"])
    assert not np.allclose(first["pooled_text"], other["pooled_text"])
    evaluation = forward_eval(batch)
    assert not np.allclose(first["pooled_text"], evaluation["pooled_text"])
    emb = jax.jit(lambda s, b: nnx.merge(graphdef, s).embed(b), compiler_options=FAST_COMPILE)(
        state, batch)
    np.testing.assert_allclose(emb["visual"], evaluation["pooled_visual"], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb["joint"][:, :config.out_dim], axis=-1), 1.0,
                               atol=1e-5)
    assert set(emb) == set(capture.FEATURE_KINDS)
    # The pre-fusion kinds are CLR's features; `capture` multiplies the modalities' first tokens.
    np.testing.assert_allclose(emb["clr_text"], evaluation["clr_text"], atol=1e-5)
    np.testing.assert_allclose(emb["clr_visual"], evaluation["clr_visual"], atol=1e-5)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(emb["clr_concat"], np.concatenate(
        [norm(evaluation["clr_visual"]), norm(evaluation["clr_text"])], -1), atol=1e-5)
    joint_product = norm(evaluation["pooled_text"] * evaluation["pooled_visual"])
    np.testing.assert_allclose(emb["capture"][:, :config.out_dim], joint_product, atol=1e-5)
    single = emb["capture"][:, config.out_dim:]
    assert single.shape == (4, config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(single, axis=-1), 1.0, atol=1e-5)
    # `prefusion` ends with the mean word embedding of each title's own tokens.
    words = np.asarray(state["text_embeddings"]["word_embeddings"]["embedding"].get_value())
    d, h = config.out_dim, config.hidden_size
    for row, (ids, mask) in enumerate(zip(batch["text_ids"], batch["text_mask"])):
        n = int(mask.sum())
        title = norm(words[ids[1:n - 1]].mean(0))
        np.testing.assert_allclose(emb["prefusion"][row, 2 * d + h:], 2.0 * title, atol=1e-5)
    np.testing.assert_allclose(emb["prefusion"][:, :2 * d], emb["clr_concat"], atol=1e-5)


def test_paper_forward_flops_match_spec():
    flops = cost.forward_flops(capture_configs.get_config("paper").model, batch_size=2)
    assert abs(flops / 13.9e9 - 1) < 0.05, flops


def test_mlm_positions_take_the_first_selections_in_order():
    labels = jnp.array([[-1, 7, -1, 9, 4], [-1, -1, -1, -1, -1], [3, -1, -1, -1, 8]])
    positions, picked = capture.mlm_positions(labels, 2)
    np.testing.assert_array_equal(positions[0], [1, 3])
    np.testing.assert_array_equal(picked, [[7, 9], [-1, -1], [3, 8]])
    assert capture.mlm_positions(labels, 9)[0].shape == (3, 5)  # At most T positions.


def test_mlm_logits_at_selected_positions_only_give_the_full_loss_and_gradients():
    """mlm_max_predictions = K: the same MLM loss and gradients as logits everywhere while no row
    has more than K selections; past K, exactly the loss without a row's later selections."""
    config = tiny_config("regions")
    batch = make_batch(config, batch_size=4)
    labels = np.full_like(batch["mlm_labels"], -1)
    labels[0, [1, 3]] = [9, 11]  # 2, 1, 0 and 2 selections per row
    labels[1, 2], labels[3, [1, 2]] = 20, [30, 40]
    loss_config = ml_collections.ConfigDict(dict(loss=capture_configs.get_config().loss))

    def mlm_and_grads(k):
        """(labels -> (MLM loss, gradients)) of the tiny model (same weights for every K)."""
        graphdef, state = nnx.split(build(tiny_config("regions", mlm_max_predictions=k)))

        def mlm(state, labels):
            inputs = dict(batch, mlm_labels=labels)
            outputs = nnx.merge(graphdef, state)(inputs, train=False)
            return losses.compute_losses(outputs, inputs, loss_config)[1]["mlm"]
        grad_fn = jax.jit(jax.value_and_grad(mlm), compiler_options=FAST_COMPILE)
        return lambda labels: grad_fn(state, labels)

    everywhere, at_two = mlm_and_grads(0), mlm_and_grads(2)
    (full, full_grads), (masked, masked_grads) = everywhere(labels), at_two(labels)
    np.testing.assert_allclose(masked, full, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 full_grads, masked_grads)
    more = labels.copy()
    more[0, 4] = 13  # A third selection in row 0: past K = 2, not scored.
    np.testing.assert_allclose(at_two(more)[0], everywhere(labels)[0], rtol=1e-5)
    assert not np.isclose(everywhere(more)[0], full)


def test_mlm_at_selected_positions_costs_fewer_flops():
    config = tiny_config("pixels")
    t, k = config.text.length, 2
    saved = cost.forward_flops(config) - cost.forward_flops(tiny_config("pixels",
                                                                        mlm_max_predictions=k))
    # Per skipped position: head projection, MLM transform, tied decoder (2 FLOPs per MAC).
    per_position = 2 * (config.out_dim * config.hidden_size + config.hidden_size**2
                        + config.hidden_size * config.vocab_size)
    assert 1.0 <= saved / ((t - k) * per_position) < 1.3, saved


def test_paper_train_flops_account_for_mlm_positions(monkeypatch):
    """The spec's 41.7 GFLOP less 3 x XLA's forward saving (lowering stubbed: arithmetic only)."""
    monkeypatch.setattr(cost, "forward_flops",
                        lambda c, batch_size=2: 14e9 - 1e6 * (36 - (c.mlm_max_predictions or 36)))
    config = capture_configs.get_config("paper").model
    assert cost.train_flops_per_example(config, "paper") == cost.PAPER_TRAIN_FLOPS_PER_EXAMPLE
    config.mlm_max_predictions = 8
    assert cost.train_flops_per_example(config, "paper") == 41.7e9 - 3 * 28e6
    assert cost.train_flops_per_example(config, "tiny") == 3 * (14e9 - 28e6)


def test_attention_implementation_is_checked():
    assert capture.attention_implementation(tiny_config()) is None  # 'auto'
    assert capture.attention_implementation(tiny_config(attention_impl="xla")) == "xla"
    with pytest.raises(ValueError, match="use 'auto', 'xla' or 'cudnn'"):
        capture.attention_implementation(tiny_config(attention_impl="flash"))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            build(tiny_config(dtype="bfloat16", attention_impl="cudnn"))
