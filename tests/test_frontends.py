"""Visual front ends: the model and input sides list the same kinds, an unknown kind is one
sentence on each side, the abstract batch matches real batches and the stem's parameters stay
at the model's `visual_stem`."""

import ml_collections
import pytest
from flax import nnx

from capture_jax import visual_inputs
from capture_jax.models import capture, cost, frontends
from fake_batches import make_batch, tiny_config

KINDS = sorted(frontends.FRONT_ENDS)


def test_both_sides_have_the_same_kinds():
    assert sorted(visual_inputs.VISUAL_INPUTS) == KINDS


def test_unknown_kind_is_one_sentence_on_each_side():
    model_side = rf"^Unknown visual.kind 'video': use one of {KINDS}\.$".replace("[", r"\[")
    with pytest.raises(ValueError, match=model_side):
        frontends.get("video")
    with pytest.raises(ValueError, match=model_side):
        capture.CaptureModel(tiny_config("video"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=model_side):
        cost.abstract_batch(tiny_config("video"), 2)
    config = ml_collections.ConfigDict({"model": {"visual": {"kind": "video"}}})
    with pytest.raises(ValueError, match=r"^Unknown model.visual.kind 'video': use one of "
                                         rf"{KINDS}\.$".replace("[", r"\[")):
        visual_inputs.create(config, builder=None)


@pytest.mark.parametrize("kind", KINDS)
def test_abstract_batch_matches_a_real_batch(kind):
    config = tiny_config(kind)
    abstract = cost.abstract_batch(config, 3)
    real = make_batch(config, batch_size=3)
    assert {k: (v.shape, v.dtype.kind) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype.kind) for k, v in real.items()}


def test_stem_parameters_live_on_the_model():
    config = tiny_config("pixels", visual=dict(stem_channels=8))
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: capture.CaptureModel(config, rngs=nnx.Rngs(0)))
    paths = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(model))}
    assert paths["visual_stem.kernel"] == (2, 2, 3, 8) and paths["visual_stem.bias"] == (8,)
    assert not any(p.startswith("front_end") for p in paths)
    assert paths["visual_embeddings.feature_embeddings.kernel"][0] == (8 // 2) ** 2 * 8
