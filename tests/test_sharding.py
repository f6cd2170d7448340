"""Mesh construction, rules presets, and sharded == single-device loss and gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from capture_jax import losses, sharding
from capture_jax.models import capture
from configs import capture as capture_configs
from fake_batches import FAST_COMPILE, build, make_batch, tiny_config


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": -1, "model": 2})
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == dict(data=4, fsdp=1, model=2)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh([1, -1, 1]).shape)["fsdp"] == 8
    assert dict(sharding.make_mesh((2, 2, 2)).shape) == dict(data=2, fsdp=2, model=2)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        sharding.make_mesh({"data": -1, "model": 3})
    with pytest.raises(ValueError, match="uses 4 of the 8 devices"):
        sharding.make_mesh({"data": 4})
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        sharding.make_mesh({"tensor": 8})
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh([-1, -1, 1])


def test_rules_presets_list_every_logical_axis():
    for name, preset in sharding.RULES.items():
        assert tuple(n for n, _ in preset) == sharding.LOGICAL_AXES, name
        assert dict(preset)["batch"] == ("data", "fsdp")
    with pytest.raises(ValueError, match="fsdp_tp"):
        sharding.rules("zero3")
    fsdp = sharding.rules("fsdp")
    assert sharding.logical_to_spec(("embed", "mlp"), fsdp) == P("fsdp", None)
    # Activations: the batch takes 'fsdp' first, so 'embed' stays replicated (no axis reuse).
    activation = sharding.logical_to_spec(("batch", "length", "embed"), fsdp)
    assert activation == P(("data", "fsdp"), None, None)
    with pytest.raises(ValueError, match="not in the sharding rules"):
        sharding.logical_to_spec(("channels",), fsdp)


def loss_fn(graphdef, config):
    def fn(state, batch):
        outputs = nnx.merge(graphdef, state)(batch, train=False)
        return losses.compute_losses(outputs, batch, config)[0]
    return jax.value_and_grad(fn)


LAYOUTS = [  # (mesh shape, rules, a parameter path, its expected spec)
    ({"data": 8}, "dp", ("text_layers", 0, "ffn", "intermediate", "kernel"), P(None, None)),
    ({"data": 4, "model": 2}, "tp", ("text_layers", 0, "ffn", "intermediate", "kernel"),
     P(None, "model")),
    ({"data": 2, "fsdp": 4}, "fsdp", ("text_embeddings", "word_embeddings", "embedding"),
     P(None, "fsdp")),
]


@pytest.fixture(scope="module")
def reference():
    """The tiny model's loss and gradients on one device, without mesh or rules."""
    model_config = tiny_config("regions")
    config = ml_collections.ConfigDict(dict(model=model_config,
                                            loss=capture_configs.get_config().loss))
    graphdef, state = nnx.split(build(model_config))
    batch = make_batch(model_config, batch_size=8)
    grad_fn = loss_fn(graphdef, config)
    loss, grads = jax.jit(grad_fn, compiler_options=FAST_COMPILE)(state, batch)
    return grad_fn, state, batch, loss, dict(nnx.to_flat_state(grads))


def test_every_parameter_gets_a_gradient(reference):
    dead = [path for path, g in reference[4].items() if not np.any(g[...])]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("mesh_shape,rules_name,path,spec", LAYOUTS,
                         ids=[layout[1] for layout in LAYOUTS])
def test_sharded_loss_and_gradients_equal_single_device(reference, mesh_shape, rules_name, path,
                                                        spec):
    grad_fn, state, batch, ref_loss, ref_grads = reference
    mesh, rules = sharding.make_mesh(mesh_shape), sharding.rules(rules_name)
    state_sh = sharding.state_shardings(state, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        step = jax.jit(grad_fn, in_shardings=(state_sh, batch_sh),
                       out_shardings=(NamedSharding(mesh, P()), state_sh),
                       compiler_options=FAST_COMPILE)
        loss, grads = step(jax.device_put(state, state_sh), jax.device_put(batch, batch_sh))
    flat = dict(nnx.to_flat_state(grads))
    assert flat[path][...].sharding.spec == spec
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for key, ref in ref_grads.items():
        np.testing.assert_allclose(flat[key][...], ref[...], rtol=1e-5, atol=1e-5, err_msg=str(key))


def test_activation_constraint_is_a_no_op_without_mesh_and_rules():
    x = jnp.ones((4, 3, 2))
    assert sharding.constrain(x, ("batch", "length", "embed")) is x


def test_state_shardings_agree_with_nnx_eager_sharding():
    """What the trainer gets from building under a mesh equals `state_shardings` (fsdp + tp)."""
    mesh, rules = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2}), sharding.rules("fsdp_tp")
    config = tiny_config("pixels", visual=dict(stem_channels=8))
    with nnx.logical_axis_rules(rules):
        _, abstract = nnx.get_abstract_model(
            lambda: capture.CaptureModel(config, rngs=nnx.Rngs(0)), mesh)
    ours = dict(nnx.to_flat_state(sharding.state_shardings(abstract, mesh, rules)))
    flax_specs = {path: v.get_value().sharding.spec for path, v in nnx.to_flat_state(abstract)}
    assert flax_specs == {path: v.get_value().spec for path, v in ours.items()}
    assert flax_specs[("text_embeddings", "word_embeddings", "embedding")] == P("model", "fsdp")
