"""Embedding a split for retrieval: every process embeds its slice of the rows (one jitted,
batch-sharded call per batch), and every process ends with all rows' features, ids, labels and
titles in dataset order."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from capture_jax import input_pipeline, sharding, visual_inputs
from capture_jax.evaluators import baselines

_EMBEDDERS = {}


def embedder(graphdef, model_state, mesh, rules, image_baselines: tuple[str, ...]):
    """Jitted (state, batch) -> (features dict, valid, row), all batch-sharded; cached. The
    features are the model's kinds and the image baselines'."""
    key = (graphdef, mesh, rules, image_baselines)
    if key not in _EMBEDDERS:
        def embed(state, batch):
            features = nnx.merge(graphdef, state).embed(batch)
            features.update(baselines.image_features(batch, image_baselines,
                                                     visual_inputs.IMAGENET_MEAN,
                                                     visual_inputs.IMAGENET_STD))
            return features, batch["valid"], batch["row"]
        batch_sh = sharding.batch_sharding(mesh, rules)
        _EMBEDDERS[key] = jax.jit(
            embed, in_shardings=(sharding.state_shardings(model_state, mesh, rules), batch_sh),
            out_shardings=batch_sh)
    return _EMBEDDERS[key]


def _allgather_strings(strings: list[str]) -> list[str]:
    """Every process's list, concatenated in process order, on every process."""
    if jax.process_count() == 1:
        return strings
    data = [s.encode() for s in strings]
    width = int(multihost_utils.process_allgather(np.int32(max(map(len, data), default=1))).max())
    buf = np.zeros((len(data), width), np.uint8)
    for row, d in zip(buf, data):
        row[:len(d)] = np.frombuffer(d, np.uint8)
    return [bytes(r).rstrip(b"\0").decode() for r in
            multihost_utils.process_allgather(buf, tiled=True)]


@dataclasses.dataclass
class Embedded:
    """One split's valid rows in dataset order, on every process."""

    features: dict[str, np.ndarray]  # kind -> [N, D]: model kinds and image baselines
    ids: list[str]
    labels: list[list[str]]  # as built (the scores use the official ground truth instead)
    titles: list[str]


def embed_split(experiment, model_state, split: str, batch_size: int,
                image_baselines: tuple[str, ...] = (), progress=None) -> Embedded:
    """Features, ids, labels and titles of `split`'s valid rows, in dataset order.
    `progress(batches done, batches)`, if given, is called after each batch."""
    exp = experiment
    ds = input_pipeline.EvalDataset(exp.config, exp.builder, exp.tokenizer, split, batch_size)
    rows_per_host = len(ds) * ds.batch_size
    outputs, records = [], []
    with exp.context():
        embed = embedder(exp.shapes.model_def, model_state, exp.mesh, exp.rules, image_baselines)
        for b, (batch, item_ids, labels, titles) in enumerate(ds):
            start = jax.process_index() * rows_per_host + b * ds.batch_size
            batch["row"] = np.arange(start, start + len(item_ids), dtype=np.int32)
            outputs.append(embed(model_state,
                                 input_pipeline.make_global_batch(batch, exp.batch_sharding)))
            records += [json.dumps([i, ls, t], ensure_ascii=False)
                        for i, ls, t in zip(item_ids, labels, titles)]
            if progress is not None:
                progress(b + 1, len(ds))
    features, valid, row = jax.tree.map(lambda *xs: np.concatenate(xs),
                                        *multihost_utils.process_allgather(outputs, tiled=True))
    records = [json.loads(r) for r in _allgather_strings(records)]
    order = np.argsort(row, kind="stable")
    keep = order[valid[order] == 1]
    features = {kind: np.asarray(f[keep], np.float32) for kind, f in features.items()}
    for kind, f in features.items():
        if not np.isfinite(f).all():
            raise FloatingPointError(f"The model gives non-finite {kind} features on {split}: "
                                     "the checkpoint or the training run diverged.")
    records = [records[r] for r in row[keep]]
    return Embedded(features, *(list(column) for column in zip(*records))) if records else \
        Embedded(features, [], [], [])
