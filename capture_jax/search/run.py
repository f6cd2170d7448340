"""A trained run loaded for inference: its config, tokenizer and one checkpoint step, on a
data-parallel mesh of this host's devices, with a jitted embedding per batch bucket (powers of two
up to `batch_size`, compiled at start-up by `warm_up`: a lone query runs at batch 1, not padded to
the server's batch) and per set of feature kinds (XLA drops the layers a kind does not need:
`prefusion` skips the joint encoder)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging as std_logging
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from capture_jax import checkpointing, sharding, vocab
from capture_jax.models import capture


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote (`workdir/config.json`)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a training run's workdir "
                                "(main.py writes config.json there).")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def vocab_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    path = config.get("vocab_path") or os.path.join(workdir, "vocab.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The run's vocabulary {path} is missing: the model's token ids "
                                "are tied to it; restore it from the run's workdir.")
    return path


def config_hash(config: ml_collections.ConfigDict, vocab_file: str) -> str:
    """12 hex digits naming the model's architecture and vocabulary (what features depend on,
    besides the weights, whose step the manifest names)."""
    digest = hashlib.sha256(json.dumps(config.model.to_dict(), sort_keys=True).encode())
    with open(vocab_file, "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()[:12]


def pick_step(workdir: str, step: int) -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager of the run's checkpoints and the step to load (-1: the latest)."""
    directory = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoints in {workdir} ({directory} is missing): train "
                                "the run first, or pass the --workdir of a trained run.")
    absl_logger = logging.get_absl_logger()  # Orbax warns that a read-only manager saves nothing.
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)
    try:
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            create=False, read_only=True))
    finally:
        absl_logger.setLevel(level)
    steps = list(manager.all_steps())
    if step < 0 and not steps:
        raise FileNotFoundError(f"No checkpoint in {directory}: train the run first.")
    step = max(steps) if step < 0 else step
    if step not in steps:
        raise FileNotFoundError(f"The checkpoint of step {step} is not in {directory} (steps "
                                f"there: {steps}): pass one of those with --step, or re-index "
                                "with this run's current checkpoint.")
    return manager, step


class Model:
    """A run's model at one step, ready to embed rows (`embed`)."""

    def __init__(self, workdir: str, step: int = -1, *, batch_size: int = 8,
                 devices: list[jax.Device] | None = None):
        self.workdir = os.path.abspath(workdir)
        config = read_config(self.workdir)
        config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
        config.sharding_rules = "dp"  # Parameters replicated; query rows split over devices.
        self.config = config
        self.vocab_file = vocab_path(config, self.workdir)
        self.tokenizer = vocab.Tokenizer(self.vocab_file, config.model.text.length)
        self.mesh = sharding.make_mesh(dict(config.mesh), devices)
        self.rules = sharding.rules("dp")
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        n = self.mesh.size
        self.batch_size = -(-batch_size // n) * n  # A multiple of the devices.
        self.buckets = sorted({-(-2**i // n) * n for i in range(self.batch_size.bit_length())}
                              | {self.batch_size})
        manager, self.step = pick_step(self.workdir, step)
        with self.context():
            abstract = nnx.eval_shape(lambda: capture.CaptureModel(config.model,
                                                                   rngs=nnx.Rngs(0)))
            self.graphdef, shapes = nnx.split(abstract)
            self.state_sharding = sharding.state_shardings(shapes, self.mesh, self.rules)
            target = checkpointing.abstract_target(shapes, self.state_sharding)
            self.state = checkpointing.restore(manager, self.step, target,
                                               purpose="evaluate")["model"]
        manager.close()
        self.fingerprint = {"variant": config.get("variant"), "step": int(self.step),
                            "config_hash": config_hash(config, self.vocab_file),
                            "workdir": self.workdir}
        self._embed = {}

    @contextlib.contextmanager
    def context(self):
        """The mesh and the logical axis rules, for building or running the model."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield

    @property
    def visual_kind(self) -> str:
        return self.config.model.visual.kind

    @property
    def image_size(self) -> int:
        return int(self.config.model.visual.image_size)

    def empty_rows(self, n: int) -> dict[str, np.ndarray]:
        """`n` rows of the pixels front end's eval batch, zero (to fill)."""
        v, t = self.config.model.visual, self.config.model.text.length
        slots = (v.image_size // v.patch_size) ** 2
        return {"text_ids": np.zeros((n, t), np.int32), "text_mask": np.zeros((n, t), np.int32),
                "mlm_labels": np.full((n, t), -1, np.int32),
                "image": np.zeros((n, v.image_size, v.image_size, 3), np.float32),
                "mrm_mask": np.zeros((n, slots), np.float32),
                "mrm_zero": np.zeros((n, slots), np.float32)}

    def _compiled(self, kinds: tuple[str, ...] | None):
        """The jitted embedding of `kinds` (None: all), one per set of kinds; jit compiles it
        once per batch shape."""
        if kinds not in self._embed:
            graphdef = self.graphdef

            def embed(state, batch):
                features = nnx.merge(graphdef, state).embed(batch)
                return {k: v for k, v in features.items() if kinds is None or k in kinds}

            with self.context():
                self._embed[kinds] = jax.jit(embed, in_shardings=(self.state_sharding,
                                                                  self.batch_sharding),
                                             out_shardings=self.batch_sharding)
        return self._embed[kinds]

    def warm_up(self, kinds: tuple[str, ...] | None = None) -> None:
        """Compiles the embedding of `kinds` for every batch bucket (once; every later call
        reuses them)."""
        for size in self.buckets:
            rows = self.empty_rows(size)
            rows["text_mask"][:, :2] = 1
            self.embed(rows, kinds)

    def embed(self, rows: dict[str, np.ndarray], kinds: tuple[str, ...] | None = None
              ) -> dict[str, np.ndarray]:
        """Features {kind: float32 [n, D]} of `rows` (numpy, as `empty_rows`), in calls of
        `batch_size` rows; the last call's rows are padded (copies of its first row) to the
        smallest bucket that holds them."""
        kinds = tuple(sorted(kinds)) if kinds is not None else None
        embed, b = self._compiled(kinds), self.batch_size
        n = len(rows["text_ids"])
        out: dict[str, list[np.ndarray]] = {}
        with self.context():
            for start in range(0, n, b):
                chunk = {k: v[start:start + b] for k, v in rows.items()}
                m = len(chunk["text_ids"])
                size = next(s for s in self.buckets if s >= m)
                if m < size:
                    chunk = {k: np.concatenate([v, np.repeat(v[:1], size - m, 0)])
                             for k, v in chunk.items()}
                batch = {k: jax.device_put(v, self.batch_sharding) for k, v in chunk.items()}
                for kind, f in embed(self.state, batch).items():
                    out.setdefault(kind, []).append(np.asarray(f)[:m])
        return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def feature_kinds(names: list[str], config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Feature kinds from a flag: names of `capture.FEATURE_KINDS`, `all`, or none (the run's
    headline kind)."""
    if not names:
        headline = config.evals.retrieval.get("headline", "joint")
        return (headline if headline in capture.FEATURE_KINDS else "joint",)
    if names == ["all"]:
        return tuple(capture.FEATURE_KINDS)
    unknown = [k for k in names if k not in capture.FEATURE_KINDS]
    if unknown:
        raise ValueError(f"Unknown feature kinds {unknown}: choose from "
                         f"{list(capture.FEATURE_KINDS)} or all.")
    return tuple(dict.fromkeys(names))
