"""One run's set-up, done once: `setup(config, workdir)` -> `Experiment`.

The trainer, the evaluators and `main.py --mode=evaluate` all start from the same object: the mesh
and logical sharding rules, the dataset builder (a synthetic dataset is built here on first use),
the tokenizer (a learned vocabulary is learned here, once), the config with the model's vocabulary
size resolved, the optimiser, and the shapes and shardings of the model and optimiser states
(nothing allocated). Every user mistake found on the way is one sentence (a `ValueError` or
`FileNotFoundError`) before anything is trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import jax
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding

from capture_jax import convert, input_pipeline, optim, sharding, vocab
from capture_jax.train_state import TrainState, train_state_shapes


@dataclasses.dataclass
class Experiment:
    """What a run is made of; built by `setup`, read by the trainer and the evaluators."""

    config: ml_collections.ConfigDict  # As given, with the vocabulary size (and a BERT start's
    workdir: str  # vocabulary) resolved. An absolute path.
    mesh: jax.sharding.Mesh
    rules: tuple  # Logical axis name -> mesh axes.
    builder: Any  # tfds.core.DatasetBuilder of config.dataset.
    tokenizer: vocab.Tokenizer
    tx: optax.GradientTransformation
    shapes: TrainState  # Abstract model/optimiser states with their shardings.
    batch_sharding: NamedSharding

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (process 0)."""
        return jax.process_index() == 0

    @contextlib.contextmanager
    def context(self):
        """The mesh and the logical axis rules, for building or running the model."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield



def setup(config: ml_collections.ConfigDict, workdir: str,
          devices: list[jax.Device] | None = None) -> Experiment:
    """Builds the run's `Experiment`; `devices` (default: all) are those the mesh spans."""
    workdir = os.path.abspath(workdir)
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    rules = sharding.rules(config.sharding_rules)
    check_batch(config, mesh)
    config = resolve_init(config)
    builder = input_pipeline.get_builder(config)
    input_pipeline.check_dataset(config, builder)  # The data fits the visual front end.
    tokenizer = vocab.load_tokenizer(config, workdir, builder)
    config = with_vocab_size(config, tokenizer.vocab_size)
    tx = optim.create_optimizer(config)
    exp = Experiment(config, workdir, mesh, rules, builder, tokenizer, tx, None,
                     sharding.batch_sharding(mesh, rules))
    with exp.context():
        exp.shapes = train_state_shapes(config, mesh, rules, tx)
    return exp


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
    """One sentence if the global batch does not divide over the mesh's batch axes."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.global_batch_size % batch_shards:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} does not divide over the "
            f"{batch_shards} data x fsdp devices of mesh {dict(mesh.shape)}: make it a multiple of "
            f"{batch_shards} (--config.global_batch_size) or change --config.mesh."
        )


def with_vocab_size(config: ml_collections.ConfigDict, vocab_size: int):
    """A copy of `config` whose embedding table fits the tokenizer's vocabulary.

    The table is padded to a multiple of `config.vocab_pad_multiple` rows (bert-base-chinese's
    21,128 already is a multiple of 8) so tensor parallelism can split it; the tokenizer never
    produces the padding ids. The size does not depend on the mesh, so checkpoints move freely.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    multiple = max(config.vocab_pad_multiple, 1)
    padded = -(-vocab_size // multiple) * multiple
    if config.model.vocab_size != padded:
        logging.info("Model vocab_size %d -> %d (the tokenizer's %d, padded to a multiple of %d).",
                     config.model.vocab_size, padded, vocab_size, multiple)
        config.model.vocab_size = padded
    return config


def resolve_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config`; a BERT start also brings its vocabulary."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.init_from.checkpoint and config.init_from.bert:
        raise ValueError("Set one of config.init_from.checkpoint and config.init_from.bert, not "
                         "both: a checkpoint already holds the text stream.")
    if config.init_from.bert and not config.vocab_path:
        config.vocab_path = convert.bert_vocab_path(config.init_from.bert)
    return config
