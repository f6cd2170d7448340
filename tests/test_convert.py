"""Weight import: a random Hugging Face BERT written with numpy + safetensors (no network, no
PyTorch) against a numpy BERT forward; the reference-checkpoint conversion round trip."""

import json
import math
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from capture_jax import checkpointing, cli, convert
from capture_jax.models import capture, layers
from configs import capture as capture_configs
from fake_batches import build

EPS = 1e-12
BERT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=5,
            vocab_size=100, max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=EPS,
            hidden_act="gelu", model_type="bert")


def model_config():
    """The tiny variant with a text stream of BERT's sizes (4 of its 5 layers), no dropout."""
    config = capture_configs.get_config("tiny").model
    config.update(hidden_size=32, vocab_size=100, max_text_positions=40, layer_norm_eps=EPS,
                  dropout_rate=0.0, attention_dropout_rate=0.0)
    config.text.update(num_heads=2, mlp_dim=64, num_layers=4)
    return config


def random_bert(seed=0):
    """BERT tensors in Hugging Face naming ([out, in] Linear weights), canonical names."""
    rng = np.random.default_rng(seed)
    d, f, v = BERT["hidden_size"], BERT["intermediate_size"], BERT["vocab_size"]
    normal = lambda *s, std=0.2: (rng.normal(size=s) * std).astype(np.float32)  # noqa: E731
    w = {}

    def ln(prefix):
        w[prefix + ".weight"] = 1 + normal(d, std=0.1)
        w[prefix + ".bias"] = normal(d, std=0.1)

    def linear(prefix, n_out, n_in):
        w[prefix + ".weight"] = normal(n_out, n_in)
        w[prefix + ".bias"] = normal(n_out, std=0.1)

    w["bert.embeddings.word_embeddings.weight"] = normal(v, d, std=1.0)
    w["bert.embeddings.position_embeddings.weight"] = normal(BERT["max_position_embeddings"], d)
    w["bert.embeddings.token_type_embeddings.weight"] = normal(2, d)
    ln("bert.embeddings.LayerNorm")
    for i in range(BERT["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            linear(p + "attention.self." + name, d, d)
        linear(p + "attention.output.dense", d, d)
        ln(p + "attention.output.LayerNorm")
        linear(p + "intermediate.dense", f, d)
        linear(p + "output.dense", d, f)
        ln(p + "output.LayerNorm")
    linear("bert.pooler.dense", d, d)
    linear("cls.predictions.transform.dense", d, d)
    ln("cls.predictions.transform.LayerNorm")
    w["cls.predictions.bias"] = normal(v, std=0.1)
    w["cls.predictions.decoder.weight"] = w["bert.embeddings.word_embeddings.weight"]
    linear("cls.seq_relationship", 2, d)
    return w


def write_bert(directory, weights, *, old_naming=False, bert_prefix=True, head=True, **config):
    """A Hugging Face BERT directory: config.json, vocab.txt, model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(BERT, **config)))
    (directory / "vocab.txt").write_text("".join(f"tok{i}\n" for i in range(BERT["vocab_size"])))
    out = {}
    for name, value in weights.items():
        if not head and name.startswith("cls."):
            continue
        if old_naming:
            name = name.replace("LayerNorm.weight", "LayerNorm.gamma")
            name = name.replace("LayerNorm.bias", "LayerNorm.beta")
        if not bert_prefix:
            name = name.removeprefix("bert.")
        out[name] = np.ascontiguousarray(value)
    save_file(out, str(directory / "model.safetensors"))
    return str(directory)


# --------------------------------------------------------------------------- numpy BERT
def np_layer_norm(x, w, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * w[prefix + ".weight"] + w[prefix + ".bias"]


def np_linear(x, w, prefix):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def np_bert(w, ids, mask, num_layers):
    """Post-LN BERT encoder (float64), token type 0, additive mask (1 - mask) * -10000."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    b, t = ids.shape
    heads, d = BERT["num_attention_heads"], BERT["hidden_size"]
    x = (w["bert.embeddings.word_embeddings.weight"][ids]
         + w["bert.embeddings.position_embeddings.weight"][:t]
         + w["bert.embeddings.token_type_embeddings.weight"][0])
    x = np_layer_norm(x, w, "bert.embeddings.LayerNorm")
    bias = ((1.0 - mask) * -10000.0)[:, None, None, :]
    for i in range(num_layers):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (np_linear(x, w, p + "attention.self." + n).reshape(b, t, heads, d // heads)
                   .transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = np_layer_norm(x + np_linear(ctx, w, p + "attention.output.dense"), w,
                          p + "attention.output.LayerNorm")
        h = np_gelu(np_linear(x, w, p + "intermediate.dense"))
        x = np_layer_norm(x + np_linear(h, w, p + "output.dense"), w, p + "output.LayerNorm")
    return x


def np_mlm_logits(w, h):
    w = {k: v.astype(np.float64) for k, v in w.items()}
    h = np_gelu(np_linear(h, w, "cls.predictions.transform.dense"))
    h = np_layer_norm(h, w, "cls.predictions.transform.LayerNorm")
    return h @ w["bert.embeddings.word_embeddings.weight"].T + w["cls.predictions.bias"]


@pytest.fixture(scope="module")
def tiny():
    config = model_config()
    return config, nnx.state(build(config, seed=1))


def flat(state):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


# --------------------------------------------------------------------------- BERT import
def test_bert_text_stream_matches_numpy_bert(tiny, tmp_path):
    config, state = tiny
    weights = random_bert()
    new_state, report = convert.load_bert_weights(state, write_bert(tmp_path / "bert", weights),
                                                  config)
    assert len(report["loaded"]) == 5 + 4 * 16 + 5
    assert {p.split(".")[0] for p in report["loaded"]} == {"text_embeddings", "text_layers",
                                                           "mlm_head"}
    assert "visual_layers.0.attention.query.kernel" in report["random"]
    assert "bert.encoder.layer.4.output.dense.weight" in report["unused"]
    before, after = flat(state), flat(new_state)
    for path in report["random"]:
        np.testing.assert_array_equal(before[path], after[path], err_msg=path)

    model = nnx.merge(nnx.graphdef(build(config)), new_state)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, BERT["vocab_size"], (3, 12)).astype(np.int32)
    mask = (np.arange(12)[None] < np.array([[12], [7], [3]])).astype(np.float32)
    x = model.text_embeddings(ids, None)
    bias = layers.attention_bias(mask, layers.STREAM_MASK_VALUE)
    ours = layers.run_stack(model.text_layers, x, bias)
    expected = np_bert(weights, ids, mask, num_layers=4)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=1e-5)
    logits = model.mlm_head(ours, model.text_embeddings.word_embeddings)
    np.testing.assert_allclose(np.asarray(logits), np_mlm_logits(weights, expected),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bert_prefix", [True, False])
def test_old_layer_norm_naming_and_no_mlm_head(tiny, tmp_path, bert_prefix):
    """gamma/beta names, a `BertModel` save (no `bert.` prefix, no head): the head stays random."""
    config, state = tiny
    weights = random_bert(seed=3)
    bert_dir = write_bert(tmp_path / "bert", weights, old_naming=True, bert_prefix=bert_prefix,
                          head=False)
    new_state, report = convert.load_bert_weights(state, bert_dir, config)
    after, before = flat(new_state), flat(state)
    assert len(report["loaded"]) == 5 + 4 * 16
    assert {"mlm_head.dense.kernel", "mlm_head.bias"} <= set(report["random"])
    np.testing.assert_array_equal(after["mlm_head.bias"], before["mlm_head.bias"])
    np.testing.assert_array_equal(after["text_embeddings.layer_norm.scale"],
                                  weights["bert.embeddings.LayerNorm.weight"])
    np.testing.assert_array_equal(after["text_layers.3.ffn.norm.bias"],
                                  weights["bert.encoder.layer.3.output.LayerNorm.bias"])
    np.testing.assert_array_equal(after["text_layers.2.ffn.intermediate.kernel"],
                                  weights["bert.encoder.layer.2.intermediate.dense.weight"].T)


def test_bert_errors(tiny, tmp_path, monkeypatch):
    config, state = tiny
    weights = random_bert()
    bad = dict(weights)
    bad["bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros((60, 32), np.float32)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense\.weight"
                       r".*\(60, 32\).*text_layers\.1\.ffn\.intermediate\.kernel needs \(64, 32\)"):
        convert.load_bert_weights(state, write_bert(tmp_path / "shape", bad), config)

    missing = {k: v for k, v in weights.items() if k != "bert.encoder.layer.2.output.dense.bias"}
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*bert\.encoder\.layer\.2\.output\.dense"
                       r"\.bias"):
        convert.load_bert_weights(state, write_bert(tmp_path / "missing", missing), config)

    with pytest.raises(ValueError, match=r"hidden_size=48 where config\.model\.hidden_size=32.*"
                       r"num_hidden_layers=3 where config\.model\.text\.num_layers=4 needs"):
        convert.load_bert_weights(state, write_bert(tmp_path / "sizes", weights, hidden_size=48,
                                                    num_hidden_layers=3), config)

    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        convert.bert_vocab_path(str(tmp_path))
    assert convert.bert_vocab_path(str(tmp_path / "sizes")).endswith("sizes/vocab.txt")

    torch_dir = tmp_path / "torch"
    torch_dir.mkdir()
    (torch_dir / "config.json").write_text(json.dumps(BERT))
    (torch_dir / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match="needs PyTorch, which is not installed.*safetensors"):
        convert.load_bert_weights(state, str(torch_dir), config)


def test_bert_import_keeps_shardings(tiny, tmp_path):
    config, state = tiny
    mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    rows = NamedSharding(mesh, P("x"))
    state = jax.tree.map(lambda a: jax.device_put(a, rows if a.shape[0] % 2 == 0 else
                                                  NamedSharding(mesh, P())), state)
    new_state, report = convert.load_bert_weights(
        state, write_bert(tmp_path / "bert", random_bert()), config)
    old = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(state)}
    new = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(new_state)}
    assert new.keys() == old.keys()
    for key in new:
        assert new[key].sharding == old[key].sharding, key
    assert "text_embeddings.word_embeddings.embedding" in report["loaded"]
    assert new["text_embeddings.word_embeddings.embedding"].sharding == rows


# --------------------------------------------------------------------------- reference checkpoints
def test_reference_conversion_round_trip(tmp_path):
    """Random `paper` parameters -> reference names (+ unused tensors, a DDP prefix) -> convert
    CLI -> Orbax checkpoint -> restore: identical parameters."""
    config = capture_configs.get_config("paper").model
    with nnx.use_eager_sharding(False):
        abstract = nnx.state(nnx.eval_shape(lambda: capture.CaptureModel(config,
                                                                         rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), abstract)
    state_dict = convert.params_to_reference(state, config)
    unused = {"bert.encoder.c_layer.0.biOutput.q_dense1.weight": np.zeros((8, 8), np.float32),
              "bert.cross_encoder.pooler.dense.bias": np.zeros(8, np.float32)}
    state_dict = {"module." + k: v for k, v in {**state_dict, **unused}.items()}
    source = tmp_path / "pytorch_model_9.safetensors"
    save_file(state_dict, str(source))
    del state_dict

    cli.call(convert, ["--reference_checkpoint", str(source), "--config", "paper",
                       "--output", str(tmp_path / "out")])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = checkpointing.abstract_target(abstract, jax.tree.map(lambda _: device, abstract))
    restored, step = checkpointing.restore_weights(str(tmp_path / "out"), target)
    assert step == 0
    expected, got = flat(state), flat(restored)
    assert expected.keys() == got.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
    meta = json.loads((tmp_path / "out/checkpoints/0/meta/metadata").read_text())
    assert meta["step"] == 0 and meta["converted_from"] == "reference"
    assert meta["source"] == str(source) and sorted(meta["unused"]) == sorted(unused)


def test_reference_report_and_cli_errors(tmp_path):
    config = capture_configs.get_config("tiny").model
    state = nnx.state(build(config))
    state_dict = convert.params_to_reference(state, config)
    params, report = convert.reference_to_params(
        {**state_dict, "bert.embeddings.position_ids": np.arange(64)}, config)
    assert report == {"missing": [], "tied": ["cls.predictions.decoder.weight"],
                      "unused": ["bert.embeddings.position_ids"]}
    np.testing.assert_array_equal(params[("co_layers", 0, "visual_query", "kernel")],
                                  flat(state)["co_layers.0.visual_query.kernel"])

    del state_dict["bert.t_fc.dense.bias"]
    save_file(state_dict, str(tmp_path / "partial.safetensors"))
    with pytest.raises(SystemExit, match=r"lacks 1 tensor.*bert\.t_fc\.dense\.bias"):
        cli.call(convert, ["--reference_checkpoint", str(tmp_path / "partial.safetensors"),
                           "--config", "tiny", "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="neither a model variant"):
        cli.call(convert, ["--reference_checkpoint", "x.bin", "--config", "nope",
                           "--output", str(tmp_path / "out")])


def test_config_argument(tmp_path):
    """--config takes a variant name of configs/capture.py or FILE.py:ARG (its
    get_config(ARG).model)."""
    config_file = tmp_path / "my_config.py"
    config_file.write_text(
        "import ml_collections\n"
        "def get_config(arg):\n"
        "    return ml_collections.ConfigDict(dict(model=dict(hidden_size=int(arg)), seed=0))\n")
    from_file = convert.model_config_from_arg(f"{config_file}:48")
    assert from_file.to_dict() == {"hidden_size": 48}
    demo = convert.model_config_from_arg(f"{convert.CONFIGS_FILE}:demo")
    assert demo.to_dict() == capture_configs.get_config("demo").model.to_dict()
    tiny = convert.model_config_from_arg("tiny")
    assert tiny.to_dict() == capture_configs.get_config("tiny").model.to_dict()
