"""Weight import from files users already have: bert-base-chinese and reference CAPTURE models.

Two weights-only paths (the optimiser starts fresh, the step is 0), both driven by the one name
table in `capture_jax.reference_names`:

- `load_bert_weights(state, DIR, config.model)` (for `config.init_from.bert = DIR`): a local
  Hugging Face BERT directory (`config.json`, `vocab.txt`, `model.safetensors` or
  `pytorch_model.bin`). Copies the embeddings, BERT layers 0..n-1 into our n text layers and the
  MLM head transform/bias; everything else stays as initialised. The reference CAPTURE model
  names its text stream exactly like BERT (`bert.embeddings.*`, `bert.encoder.layer.{i}.*`,
  `cls.predictions.*`), so BERT files go through the same table.
- `python -m capture_jax.convert --reference_checkpoint=pytorch_model_N.bin --config=paper
  --output=DIR`: converts a state dict of the authors' `BertForMultiModalPreTraining` into an
  Orbax checkpoint, `DIR/checkpoints/0` (items `model` + `meta`), that `config.init_from.checkpoint`
  and `main.py --mode=evaluate` accept. Unused reference tensors are reported and dropped.

Files: `.safetensors` is read with `safetensors.numpy` (no PyTorch); `.bin`/`.pt`/`.pth` need
PyTorch and are read with `torch.load(weights_only=True)` (never a full unpickle). Accepted name
variants: the old `LayerNorm.gamma/beta` for `LayerNorm.weight/bias`, files saved from `BertModel`
(no `bert.` prefix) and from `DistributedDataParallel` (a `module.` prefix).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from flax import nnx

from capture_jax import checkpointing, cli, reference_names
from capture_jax.models import capture

# The reference tensors that a BERT checkpoint provides (the text half of the name table).
BERT_TENSORS = re.compile(r"bert\.embeddings\.|bert\.encoder\.layer\.\d+\.|cls\.predictions\.")
# BERT tensors that may be absent (files saved from `BertModel` have no MLM head): stay random.
OPTIONAL_BERT_TENSORS = re.compile(r"cls\.predictions\.")
BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# config.json key -> (our config.model field, how BERT's value must relate to ours).
_BERT_CONFIG_FIELDS = (
    ("hidden_size", "hidden_size", "=="),
    ("vocab_size", "vocab_size", "=="),
    ("num_attention_heads", "text.num_heads", "=="),
    ("intermediate_size", "text.mlp_dim", "=="),
    ("num_hidden_layers", "text.num_layers", ">="),
    ("max_position_embeddings", "max_text_positions", "=="),
    ("type_vocab_size", "type_vocab_size", "=="),
)

StateDict = dict[str, np.ndarray]
FlatParams = dict[tuple[str | int, ...], np.ndarray]


# --------------------------------------------------------------------------- reading files
def read_state_dict(path: str | os.PathLike) -> StateDict:
    """All tensors of a `.safetensors` file (no PyTorch needed) or a PyTorch `.bin`/`.pt` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weight file {path} does not exist: check the path.")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # the Rust reader raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file ({e}); check that the "
                             "download or copy completed.") from e
    if not path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"Cannot tell the format of {path}: use a .safetensors file, or a "
                         f"PyTorch state dict ending in {', '.join(TORCH_SUFFIXES)}.")
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle and reading it needs PyTorch, which is not installed: "
            "`pip install torch` (the CPU wheel is enough), or convert the file to safetensors "
            "once on a machine that has PyTorch (safetensors.torch.save_file(torch.load(path, "
            "weights_only=True), 'model.safetensors')) and pass that file instead.") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a PyTorch state dict ({type(e).__name__}: "
                         f"{str(e)[:300]}); it must be a plain state dict saved with torch.save."
                         ) from e
    for key in ("state_dict", "model"):  # training scripts sometimes wrap the state dict
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    return {name: _torch_to_numpy(t) for name, t in obj.items() if isinstance(t, torch.Tensor)}


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.element_size() < 4:  # bf16/fp16: numpy lacks bf16
        tensor = tensor.float()
    return tensor.numpy()


def normalise_names(state_dict: Mapping[str, np.ndarray]) -> StateDict:
    """Canonical reference/BERT names: no `module.` prefix, a `bert.` prefix on the encoder part,
    `LayerNorm.weight/bias` for the old `LayerNorm.gamma/beta`."""
    out: StateDict = {}
    for name, value in state_dict.items():
        new = name.removeprefix("module.")
        if new.startswith(("embeddings.", "encoder.", "pooler.")):
            new = "bert." + new
        new = re.sub(r"(LayerNorm\d?)\.gamma$", r"\1.weight", new)
        new = re.sub(r"(LayerNorm\d?)\.beta$", r"\1.bias", new)
        if new in out:
            raise ValueError(f"The state dict holds two tensors for {new} (one of them is "
                             f"{name}); keep only one naming.")
        out[new] = value
    return out


# --------------------------------------------------------------------------- name table
def _path(ours: str) -> tuple[str | int, ...]:
    """'text_layers.0.attention.query.kernel' -> ('text_layers', 0, 'attention', ...)."""
    return tuple(int(p) if p.isdigit() else p for p in ours.split("."))


def _path_str(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def _param_shapes(model_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes for `model_config`, without allocating anything."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: capture.CaptureModel(model_config, rngs=nnx.Rngs(0)))
    return {_path_str(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}


def _to_ours(name: str, value: np.ndarray, ours: str, transpose: bool,
             shape: Sequence[int], source: str) -> np.ndarray:
    """One reference tensor in our layout (float32), after checking its shape."""
    value = np.asarray(value)
    expected = tuple(shape)[::-1] if transpose else tuple(shape)
    if value.shape != expected:
        layout = f" (our {tuple(shape)} transposed)" if transpose else ""
        raise ValueError(
            f"Shape mismatch for {name} in {source}: the file has {value.shape}, but our "
            f"parameter {ours} needs {expected}{layout}. The file was made for a different model "
            "size: choose the matching config.model.")
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
        raise ValueError(f"{name} in {source} has dtype {value.dtype}, not a float type.")
    return (value.T if transpose else value).astype(np.float32)


def reference_to_params(state_dict: Mapping[str, np.ndarray],
                        model_config: ml_collections.ConfigDict,
                        source: str = "the state dict") -> tuple[FlatParams, dict[str, list[str]]]:
    """A reference CAPTURE state dict -> our parameters {path tuple: float32 array}, shapes checked.

    Report: `unused` (tensors we drop: never-trained modules, unknown names), `tied` (the MLM
    decoder weight, which is our word-embedding table) and `missing` (table entries the file lacks;
    those parameters are absent from the result).
    """
    state_dict = normalise_names(state_dict)
    table = reference_names.reference_name_table(model_config)
    shapes = _param_shapes(model_config)
    params: FlatParams = {}
    for name, (ours, transpose) in table.items():
        if name in state_dict:
            params[_path(ours)] = _to_ours(name, state_dict[name], ours, transpose, shapes[ours],
                                           source)
    report = {
        "missing": [n for n in table if n not in state_dict],
        "tied": [n for n in state_dict if n in reference_names.TIED_REFERENCE_TENSORS],
        "unused": sorted(n for n in state_dict
                         if n not in table and n not in reference_names.TIED_REFERENCE_TENSORS),
    }
    for name in report["tied"]:
        words = state_dict.get("bert.embeddings.word_embeddings.weight")
        if words is not None and not np.array_equal(np.asarray(state_dict[name]), words):
            logging.warning("%s differs from the word embeddings in %s; the model ties them, so "
                            "the word embeddings are used.", name, source)
    return params, report


def params_to_reference(model_state: nnx.State,
                        model_config: ml_collections.ConfigDict) -> StateDict:
    """Our parameters -> a reference-named state dict (the inverse table, tied decoder included)."""
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(model_state)}
    out: StateDict = {}
    for name, (ours, transpose) in reference_names.reference_name_table(model_config).items():
        value = np.asarray(jax.device_get(flat[ours][...]))
        out[name] = np.ascontiguousarray(value.T if transpose else value)
    for name in reference_names.TIED_REFERENCE_TENSORS:
        out[name] = out["bert.embeddings.word_embeddings.weight"]
    return out


def _replace(model_state: nnx.State, arrays: Mapping[str, np.ndarray]) -> nnx.State:
    """A copy of `model_state` with `arrays` (by path) placed like the leaves they replace."""
    flat = []
    for path, var in nnx.to_flat_state(model_state):
        value = arrays.get(_path_str(path))
        if value is None:
            flat.append((path, var.replace(var[...])))
            continue
        like = var[...]
        value = np.asarray(value, dtype=like.dtype)
        sharding = getattr(like, "sharding", None)
        placed = (jnp.asarray(value) if sharding is None else  # works on multi-host meshes too
                  jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i]))
        flat.append((path, var.replace(placed)))
    return nnx.from_flat_state(flat)


def _summary(paths: Sequence[str]) -> str:
    """'text_embeddings (4), text_layers (64)': tensors per top-level module."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.split(".")[0]] = counts.get(p.split(".")[0], 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in counts.items()) or "nothing"


# --------------------------------------------------------------------------- BERT
def bert_vocab_path(bert_dir: str) -> str:
    """`bert_dir/vocab.txt`, the tokenizer vocabulary that goes with the BERT weights."""
    path = os.path.join(os.path.expanduser(bert_dir), "vocab.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: config.init_from.bert must be a Hugging Face BERT directory "
            "with config.json, vocab.txt and model.safetensors (or pytorch_model.bin).")
    return path


def _bert_config(bert_dir: str) -> dict[str, Any]:
    path = os.path.join(bert_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: config.init_from.bert must be a Hugging Face BERT directory "
            "with config.json, vocab.txt and model.safetensors (or pytorch_model.bin).")
    with open(path) as f:
        return json.load(f)


def _check_bert_config(bert: Mapping[str, Any], model_config: ml_collections.ConfigDict,
                       bert_dir: str) -> None:
    """One sentence listing every size in config.json that does not fit `model_config`."""
    problems = []
    for key, field, relation in _BERT_CONFIG_FIELDS:
        ours = model_config
        for part in field.split("."):
            ours = ours[part]
        theirs = bert.get(key)
        if theirs is None:
            continue  # the tensor shapes are checked anyway
        if (theirs != ours) if relation == "==" else (theirs < ours):
            problems.append(f"{key}={theirs} where config.model.{field}={ours}"
                            + (" needs at least as many" if relation == ">=" else ""))
    if problems:
        raise ValueError(
            f"The BERT in {bert_dir} does not fit the model: its config.json has "
            f"{', '.join(problems)}; set those config.model fields to the BERT's values (the "
            "`paper` variant matches bert-base-chinese).")
    eps = bert.get("layer_norm_eps")
    if eps is not None and not np.isclose(eps, model_config.layer_norm_eps, rtol=1e-3, atol=0):
        logging.warning("BERT layer_norm_eps=%g but config.model.layer_norm_eps=%g; the model "
                        "uses its own.", eps, model_config.layer_norm_eps)
    if bert.get("hidden_act", "gelu") != "gelu":
        logging.warning("BERT hidden_act=%r; our text layers use exact (erf) GELU.",
                        bert["hidden_act"])


def _bert_weights_file(bert_dir: str) -> str:
    for name in BERT_WEIGHT_FILES:
        path = os.path.join(bert_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{bert_dir} has neither {' nor '.join(BERT_WEIGHT_FILES)}: copy the BERT weights there "
        "(see the README: getting bert-base-chinese).")


def load_bert_weights(model_state: nnx.State, bert_dir: str,
                      model_config: ml_collections.ConfigDict) -> tuple[nnx.State, dict]:
    """`model_state` with the text embeddings, text layers and MLM head taken from a local BERT.

    Returns a copy of `model_state` (concrete arrays; replaced leaves get the sharding of the
    leaves they replace) and a report {"loaded": [our paths], "random": [our paths left as they
    were], "unused": [file tensors not used]}, which is also logged. BERT layers 0..n-1 go into
    our n text layers. A file without an MLM head (saved from `BertModel`) leaves it random.
    """
    bert_dir = os.path.expanduser(bert_dir)
    if not os.path.isdir(bert_dir):
        raise FileNotFoundError(f"config.init_from.bert={bert_dir} is not a directory: give a "
                                "local Hugging Face BERT directory (see the README).")
    _check_bert_config(_bert_config(bert_dir), model_config, bert_dir)
    path = _bert_weights_file(bert_dir)
    state_dict = normalise_names(read_state_dict(path))
    table = {name: entry for name, entry in
             reference_names.reference_name_table(model_config).items() if BERT_TENSORS.match(name)}
    missing = [n for n in table if n not in state_dict and not OPTIONAL_BERT_TENSORS.match(n)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise ValueError(
            f"{path} lacks {len(missing)} tensor(s) the text stream needs: {shown}. It must be a "
            f"BERT with at least {model_config.text.num_layers} layers in Hugging Face naming.")
    shapes = {_path_str(p): tuple(v.shape) for p, v in nnx.to_flat_state(model_state)}
    arrays = {}
    for name, (ours, transpose) in table.items():
        if name in state_dict:
            if ours not in shapes:
                raise ValueError(f"model_state has no parameter {ours} (for {name}); pass the "
                                 "whole model state.")
            arrays[ours] = _to_ours(name, state_dict[name], ours, transpose, shapes[ours], path)
    new_state = _replace(model_state, arrays)
    report = {"loaded": sorted(arrays), "random": sorted(set(shapes) - set(arrays)),
              "unused": sorted(set(state_dict) - set(table))}
    loaded_size = sum(int(np.prod(shapes[p])) for p in arrays)
    logging.info("Loaded %d tensors (%d parameters) from %s: %s.", len(arrays), loaded_size,
                 path, _summary(report["loaded"]))
    logging.info("Stayed as initialised: %s.", _summary(report["random"]))
    logging.info("Not used from the file: %d tensors (deeper layers, pooler, NSP head, tied "
                 "decoder).", len(report["unused"]))
    head = [n for n in table if OPTIONAL_BERT_TENSORS.match(n) and n not in state_dict]
    if head:
        logging.warning("%s has no MLM head (%s); it stays random.", path, ", ".join(head))
    return new_state, report


# --------------------------------------------------------------------------- the convert command
FLAGS = flags.FlagValues()  # The command's own flags (the library imports this module).
flags.DEFINE_string("reference_checkpoint", None, "The authors' pytorch_model_N.bin, or the same "
                    "as .safetensors.", required=True, flag_values=FLAGS)
flags.DEFINE_string("config", "paper", "A variant of configs/capture.py (its model sizes), or "
                    "FILE.py[:ARG] (get_config(ARG).model).", flag_values=FLAGS)
flags.DEFINE_string("output", None, "Directory to write checkpoints/0 into.", required=True,
                    flag_values=FLAGS)
CONFIGS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "capture.py")


def _load_config_file(file: str):
    """The module of a config file, loaded by path (as `main.py --config` loads it)."""
    spec = importlib.util.spec_from_file_location("_capture_convert_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_config_from_arg(arg: str) -> ml_collections.ConfigDict:
    """`config.model` of a variant of configs/capture.py (`paper`) or of `path/to/file.py[:ARG]`
    (its get_config)."""
    configs = _load_config_file(CONFIGS_FILE)
    if arg in configs.VARIANTS:
        return configs.get_config(arg).model
    file, _, config_arg = arg.partition(":")
    if not file.endswith(".py") or not os.path.isfile(file):
        names = ", ".join(configs.VARIANTS)
        raise ValueError(f"--config={arg} is neither a model variant ({names}) nor an existing "
                         "config file such as configs/capture.py:paper.")
    module = _load_config_file(file)
    config = module.get_config(config_arg) if config_arg else module.get_config()
    return config.model if "model" in config else config


def convert(reference_checkpoint: str, model_config: ml_collections.ConfigDict,
            output: str) -> dict[str, list[str]]:
    """Writes `output/checkpoints/0` (model + meta) from a reference state dict; the report."""
    directory = checkpointing.checkpoint_dir(output)
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory} already holds checkpoints: choose a new --output or "
                              "delete it.")
    source = os.path.abspath(reference_checkpoint)
    params, report = reference_to_params(read_state_dict(source), model_config, source)
    if report["missing"]:
        shown = ", ".join(report["missing"][:5])
        raise ValueError(
            f"{source} lacks {len(report['missing'])} tensor(s) of the model ({shown}...): it is "
            "not a complete CAPTURE pretraining state dict for this --config.")
    if report["unused"]:
        logging.info("Dropped %d unused reference tensors: %s.", len(report["unused"]),
                     ", ".join(report["unused"]))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: capture.CaptureModel(model_config, rngs=nnx.Rngs(0)))
    state = nnx.from_flat_state([(path, var.replace(jnp.asarray(params[tuple(path)])))
                                 for path, var in nnx.to_flat_state(nnx.state(abstract))])
    meta = {"step": 0, "source": source, "converted_from": "reference",
            "unused": report["unused"], "model_config": model_config.to_dict()}
    manager = checkpointing.create_manager(output)
    checkpointing.save(manager, 0, state, meta)
    manager.wait_until_finished()
    manager.close()
    logging.info("Wrote %d parameters to %s/0.", len(params), directory)
    return report


def main(argv: Sequence[str]) -> None:
    """Converts `--reference_checkpoint` into `--output`; user errors end the process with one
    sentence."""
    cli.no_arguments(argv)
    logging.set_verbosity(logging.INFO)
    try:
        convert(FLAGS.reference_checkpoint, model_config_from_arg(FLAGS.config), FLAGS.output)
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
        raise SystemExit(f"convert: {e}") from e


if __name__ == "__main__":
    cli.run(main, FLAGS)
