"""Product1M input pipeline: TFDS `tfds_product1m` -> tf.data -> tokenised, masked batches.

Batches are dicts of numpy arrays for ONE host (B = per-host batch = global batch / process
count); `make_global_batch` turns them into global `jax.Array`s. The canonical keys:

  text_ids    int32   [B, T]  WordPiece ids `[CLS] title [SEP] 0 ...`, MLM-masked in training.
  text_mask   int32   [B, T]  1 for real tokens (CLS and SEP included), 0 for padding.
  mlm_labels  int32   [B, T]  original id at MLM-selected positions, -1 elsewhere (all -1 in eval).
  image       float32 [B, H, W, 3]  `pixels` front end: RGB resized keeping the aspect ratio,
                              padded with black to H = W = image_size, scaled to [0, 1], then
                              normalised with `visual_inputs.IMAGENET_MEAN` / `_STD`.
  visual_feats float32 [B, R, D]  `regions` front end: the first R = model.visual.num_regions
                              detector regions of the image in file order (truncated, or padded
                              with zero rows), D = model.visual.feature_dim. Unmasked: the model
                              zeroes `mrm_zero` rows and uses these as MRM targets.
  visual_boxes float32 [B, R, 5]  `regions`: (x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W*H)), box
                              corners in pixels of the W x H image the detector saw (ViLBERT's
                              5-d location; not clipped); zero rows for padding.
  visual_mask int32   [B, R]  `regions`: 1 real region, 0 padding. The model prepends the global
                              token (mean feature, location [0, 0, 1, 1, 1]), so V = R + 1.
  mrm_mask    float32 [B, P]  1 = patch/region selected for the MRM loss; P = (H / patch) *
                              (W / patch) patches in row-major order, or R regions (padding never
                              selected). All 0 in eval.
  mrm_zero    float32 [B, P]  1 = patch/region the model must zero (about 90% of mrm_mask; the
                              other 10% stay unchanged; locations are never masked). All 0 in eval.
  valid       int32   [B]     eval only: 1 real row, 0 padding row (the last batches are padded).
Eval also yields, outside the dict (jax arrays cannot hold strings), `item_ids` (np.ndarray of
str, "" for padding rows) and `labels` (list of lists of str, duplicates and order kept).
T = config.model.text.length. The model applies `mrm_zero` and derives MRM targets itself.

Masking (docs/reference.md, "Objectives"): MLM selects each real token except CLS/SEP with
p = mlm_prob; of those 80% -> [MASK], 10% -> uniform id in [first_regular_id, vocab_size), 10%
kept. MRM selects each patch or real region with p = mrm_prob; 90% of those are zeroed. The
randomness of an example depends only on (config.seed, its global position in the training
stream: step * global_batch + row in the global batch), through `tf.random.stateless_*`, so a
resumed run (`start_step`) replays exactly the same examples with exactly the same masks.

Config fields read:
  dataset.name (e.g. "tfds_product1m/synthetic_tiny"; synthetic configs are built on first use),
  dataset.data_dir (None = TFDS default), dataset.train_split, dataset.shuffle_buffer,
  model.text.length, model.visual.* (see `visual_inputs`), global_batch_size, seed,
  masking.mlm_prob, masking.mrm_prob. The builder (`get_builder`) and the tokenizer
  (`vocab.load_tokenizer`) are made once per run by `experiment.setup` and passed in.

TensorFlow is hidden from GPUs/TPUs at import: it only feeds the host, and would otherwise grab
accelerator memory that JAX preallocates.
"""

from __future__ import annotations

import collections.abc
import itertools
import math
import queue
import threading
import typing

import jax
import numpy as np
import tensorflow as tf

for _kind in ("GPU", "TPU"):  # Before any TF op runs; harmless if TF already chose devices.
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):
        pass

import orbax.checkpoint as ocp  # noqa: E402  (its multi-host barrier)
import tensorflow_datasets as tfds  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from tfds_product1m import tfds_product1m_dataset_builder  # noqa: E402,F401  (registers the builder)
from capture_jax import visual_inputs  # noqa: E402

if typing.TYPE_CHECKING:
    from capture_jax import vocab

AUTOTUNE = tf.data.AUTOTUNE


# --------------------------------------------------------------------------- processes
_BARRIERS = itertools.count()  # Barrier keys must be unique; every process counts alike.


def on_process_0(name: str, fn) -> None:
    """Runs `fn` on process 0 only; every process leaves when it is done (multi-host barrier).

    The barrier is the coordination service's (the `jax.distributed` client), not a device
    collective: `fn` (building a dataset, learning a vocabulary) may take far longer than a
    collective waits for its peers to show up (30 s for CPU's Gloo).
    """
    if jax.process_index() == 0:
        fn()
    if jax.process_count() > 1:
        barrier = ocp.multihost.get_barrier_sync_fn()
        barrier(key=f"{name}_{next(_BARRIERS)}", timeout_ms=3 * 3600 * 1000)


# --------------------------------------------------------------------------- masking
def example_seed(seed: int, position: tf.Tensor) -> tf.Tensor:
    """The stateless seed [2] of the example at global stream `position`."""
    base = tf.constant([seed, 0x43415054], tf.int64)  # "CAPT": separates it from other uses.
    return tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))


def mask_tokens(ids: tf.Tensor, seed: tf.Tensor, tokenizer: vocab.Tokenizer, prob: float,
                max_selected: int = 0):
    """BERT MLM masking of `ids` [T] -> (masked ids, labels: original id or -1). With
    `max_selected` = K > 0 (`model.mlm_max_predictions`, the positions the model scores) only
    the first K selections stay selected; the rest are left as they were, unmasked and unlabelled,
    so the model scores every token the masking changed."""
    s_select, s_kind, s_random = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    candidate = ((ids != tokenizer.pad_id) & (ids != tokenizer.cls_id)
                 & (ids != tokenizer.sep_id))
    selected = candidate & (tf.random.stateless_uniform(tf.shape(ids), s_select) < prob)
    if max_selected > 0:
        selected &= tf.cumsum(tf.cast(selected, tf.int32), axis=-1) <= max_selected
    kind = tf.random.stateless_uniform(tf.shape(ids), s_kind)
    random_ids = tf.random.stateless_uniform(
        tf.shape(ids), s_random, minval=tokenizer.first_regular_id,
        maxval=tokenizer.vocab_size, dtype=ids.dtype)
    masked = tf.where(selected & (kind < 0.8), tf.cast(tokenizer.mask_id, ids.dtype), ids)
    masked = tf.where(selected & (kind >= 0.8) & (kind < 0.9), random_ids, masked)
    return masked, tf.where(selected, ids, tf.constant(-1, ids.dtype))


# --------------------------------------------------------------------------- datasets
def get_builder(config) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `config.dataset`; synthetic configs are built on first use.

    `experiment.setup` calls this once per run and passes the builder on.
    """
    name, data_dir = config.dataset.name, config.dataset.data_dir
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared() and "synthetic" not in name:
        where = data_dir or "the TFDS default data_dir"
        raise FileNotFoundError(
            f"Dataset {name} is not built in {where}: get Product1M (README, 'Building the real "
            f"Product1M'), run `tfds build tfds_product1m --config={name.split('/')[-1]} "
            "--manual_dir=DIR --data_dir=DATA_DIR` and pass --config.dataset.data_dir=DATA_DIR; "
            "configs/capture.py:demo runs on synthetic data without any download.")
    if not builder.is_prepared():  # Synthetic: no download, build it now.
        on_process_0("capture_build_dataset", builder.download_and_prepare)
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():  # A data_dir that is not shared: build locally.
            builder.download_and_prepare()
    return builder


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    """One sentence if `split` was not built."""
    if split not in builder.info.splits:
        raise ValueError(f"Split {split!r} is not in {builder.info.full_name} (built splits: "
                         f"{sorted(builder.info.splits)}); choose one of those.")


def image_decoders(builder) -> dict | None:
    """Leaves the JPEG bytes undecoded (decoded later, or never); None when there is no image."""
    return {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None


def read_titles(builder, split: str) -> list[str]:
    """Every title of `split`, in file order (to learn a vocabulary from)."""
    check_split(builder, split)
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=image_decoders(builder),
                            read_config=tfds.ReadConfig(try_autocache=False))
    return [t.decode() for t in ds.map(lambda ex: ex["title"]).as_numpy_iterator()]


def check_dataset(config, builder) -> None:
    """Raises one sentence if the built dataset does not fit `config.model.visual`."""
    visual_inputs.create(config, builder)


def train_records(builder, split, seed: int, buffer: int, start: int) -> tf.data.Dataset:
    """(position, serialized example) from stream position `start` on, shuffled per epoch.

    Epoch e's order (file order, then a `buffer`-row shuffle) depends only on (seed, e). Whole
    epochs before `start` are never read and the rest are skipped still serialized, so resuming
    late in a long run costs at most one epoch of raw reads (no parsing, no image decoding).
    """
    if builder.info.file_format.value != "tfrecord":
        raise ValueError(f"{builder.info.full_name} is stored as {builder.info.file_format.value}: "
                         "rebuild it with the default --file_format=tfrecord.")
    instructions = builder.info.splits[split].file_instructions
    per_epoch = sum(i.take for i in instructions)
    if per_epoch == 0:
        raise ValueError(f"Split {split} is empty on this host: use more data or fewer hosts.")
    files = [i for i in instructions if i.take]
    files_ds = tf.data.Dataset.from_tensor_slices((
        [i.filename for i in files], tf.constant([i.skip for i in files], tf.int64),
        tf.constant([i.take for i in files], tf.int64)))

    def epoch(e):
        key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0x45504F43], tf.int64), e)
        s_files, s_rows = tf.unstack(tf.random.stateless_uniform(
            [2], key, minval=None, maxval=None, dtype=tf.int64))
        records = files_ds.shuffle(len(files), seed=s_files).interleave(
            lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take),
            cycle_length=min(16, len(files)), num_parallel_calls=AUTOTUNE, deterministic=True)
        return records.shuffle(buffer, seed=s_rows)

    first_epoch, offset = divmod(start, per_epoch)
    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(offset)
    return ds.enumerate(start=start)


def create_train_iterator(config, builder, tokenizer: vocab.Tokenizer, *, start_step: int = 0,
                          process_index: int | None = None, process_count: int | None = None):
    """Infinite iterator of per-host training batches (numpy dicts), starting at `start_step`.

    Each host reads its own even slice of the train split, shuffled from `config.seed` (a new
    order every epoch). Batch k of a run resumed at `start_step` equals batch start_step + k of
    an uninterrupted run, masks included. `process_index` / `process_count` (default: this JAX
    process and their number) pick the host whose batches to produce, so that one process can
    reproduce what any host of a multi-host run reads (the multi-host test does).
    """
    n_proc = jax.process_count() if process_count is None else process_count
    pid = jax.process_index() if process_index is None else process_index
    if not 0 <= pid < n_proc:
        raise ValueError(f"process_index {pid} is not in [0, {n_proc}): pass a valid host.")
    if config.global_batch_size % n_proc:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by the "
                         f"{n_proc} processes: choose a multiple of {n_proc}.")
    local_batch, global_batch = config.global_batch_size // n_proc, config.global_batch_size
    check_split(builder, config.dataset.train_split)
    visual = visual_inputs.create(config, builder)
    split = tfds.even_splits(config.dataset.train_split, n=n_proc, drop_remainder=True)[pid]
    ds = train_records(builder, split, config.seed, max(1, config.dataset.shuffle_buffer),
                        int(start_step) * local_batch)
    features, decoders = builder.info.features, image_decoders(builder)
    mlm_prob, mrm_prob, seed = config.masking.mlm_prob, config.masking.mrm_prob, config.seed
    mlm_cap = max(config.model.mlm_max_predictions, 0)

    def example(local_position, serialized):
        ex = features.deserialize_example(serialized, decoders=decoders)
        step, row = local_position // local_batch, local_position % local_batch
        key = example_seed(seed, step * global_batch + pid * local_batch + row)
        k_text, k_patch = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        ids, mask = tokenizer.encode(ex["title"][None])
        text_ids, mlm_labels = mask_tokens(ids[0], k_text, tokenizer, mlm_prob, mlm_cap)
        inputs = visual.example(ex)
        mrm_mask, mrm_zero = visual.masks(inputs, k_patch, mrm_prob)
        return {"text_ids": text_ids, "text_mask": mask[0], "mlm_labels": mlm_labels, **inputs,
                "mrm_mask": mrm_mask, "mrm_zero": mrm_zero}

    ds = ds.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(visual.finish, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE).as_numpy_iterator()


class EvalDataset:
    """Re-iterable per-host eval batches: `(batch, item_ids, labels, titles)`; `len()` = batch
    count.

    Every host yields the same number of batches (its slice padded with `valid` = 0 rows), so
    collective ops inside a jitted eval step line up across hosts.
    """

    def __init__(self, config, builder, tokenizer: vocab.Tokenizer, split: str, batch_size: int):
        check_split(builder, split)
        self._config, self._tokenizer, self._builder = config, tokenizer, builder
        self._visual = visual_inputs.create(config, self._builder)
        n_proc, pid = jax.process_count(), jax.process_index()
        self._subsplit = tfds.even_splits(split, n=n_proc, drop_remainder=False)[pid]
        self.num_examples = self._builder.info.splits[split].num_examples  # All hosts together.
        self._local_examples = self._builder.info.splits[self._subsplit].num_examples
        per_host = math.ceil(self.num_examples / n_proc)
        self.batch_size = batch_size
        self.num_batches = math.ceil(per_host / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def _dataset(self) -> tf.data.Dataset:
        visual = self._visual
        t, p, tok = self._config.model.text.length, visual.slots, self._tokenizer
        ds = self._builder.as_dataset(
            split=self._subsplit, shuffle_files=False, decoders=image_decoders(self._builder),
            read_config=tfds.ReadConfig(try_autocache=False))

        def example(ex):
            ids, mask = tok.encode(ex["title"][None])
            return {"text_ids": ids[0], "text_mask": mask[0], "mlm_labels": -tf.ones([t], tf.int32),
                    **visual.example(ex), "mrm_mask": tf.zeros([p]),
                    "mrm_zero": tf.zeros([p]), "valid": tf.constant(1, tf.int32),
                    "item_id": ex["id"], "labels": ex["labels"], "title": ex["title"],
                    "num_labels": tf.size(ex["labels"], out_type=tf.int32)}

        ds = ds.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
        pad = {k: tf.zeros([d or 0 for d in s.shape], s.dtype) for k, s in ds.element_spec.items()}
        pad["mlm_labels"] = -tf.ones([t], tf.int32)
        num_pad = self.num_batches * self.batch_size - self._local_examples
        ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(num_pad))
        ds = ds.padded_batch(self.batch_size, drop_remainder=True)  # Pads `labels` with b"".
        ds = ds.map(visual.finish, num_parallel_calls=AUTOTUNE, deterministic=True)
        return ds.prefetch(AUTOTUNE)

    def __iter__(self):
        for batch in self._dataset().as_numpy_iterator():
            item_ids = np.array([s.decode() for s in batch.pop("item_id")], dtype=str)
            labels = [[s.decode() for s in row[:n]]
                      for row, n in zip(batch.pop("labels"), batch.pop("num_labels"))]
            titles = [s.decode() for s in batch.pop("title")]
            yield batch, item_ids, labels, titles


# --------------------------------------------------------------------------- to JAX
def make_global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding):
    """Per-host numpy batch -> global `jax.Array`s, leading dim sharded by `sharding`.

    `sharding` is typically `capture_jax.sharding.batch_sharding(mesh, rules)`, i.e.
    NamedSharding(mesh, P(('data', 'fsdp'))). The global batch is per-host batch * hosts.
    """
    if isinstance(sharding, NamedSharding) and len(sharding.spec):
        axes = sharding.spec[0]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        shards = math.prod(sharding.mesh.shape[a] for a in axes)
        rows = next(iter(local_batch.values())).shape[0] * jax.process_count()
        if rows % shards:
            raise ValueError(f"Global batch {rows} does not divide over the {shards} devices of "
                             f"mesh axes {axes}: choose a batch that is a multiple of {shards}.")
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


class DevicePrefetch:
    """Global batches made `size` steps ahead by a background thread (device prefetch).

    Wraps an iterator of per-host numpy batches (`create_train_iterator`): a thread pulls from
    it and turns each batch into global `jax.Array`s (`make_global_batch`, i.e. the host to
    device copies) while the devices run the current step, so neither the hand-over from tf.data
    nor the transfer waits on the step. Order is kept. An error in the thread (bad data, a batch
    that does not divide the mesh) is raised by the `next()` that would have returned that
    batch. `size` 0 makes each batch only when asked (no thread). `close()` (or garbage
    collection) stops the thread.
    """

    _END = object()

    def __init__(self, batches: collections.abc.Iterator, sharding: jax.sharding.Sharding,
                 size: int = 2):
        self._batches, self._sharding, self._thread = batches, sharding, None
        if size <= 0:
            return
        ready: queue.Queue = queue.Queue(maxsize=size)
        stop = threading.Event()

        def put(item) -> bool:  # False once the consumer has gone.
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():  # Holds no reference to `self`, so an abandoned prefetcher is collected.
            try:
                for local in batches:
                    if not put(make_global_batch(local, sharding)):
                        return
                put(DevicePrefetch._END)
            except Exception as e:  # Handed to the consumer and raised there.
                put(e)

        self._ready, self._stop = ready, stop
        self._thread = threading.Thread(target=produce, name="device_prefetch", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._thread is None:
            return make_global_batch(next(self._batches), self._sharding)
        if self._stop.is_set():
            raise StopIteration
        item = self._ready.get()
        if item is DevicePrefetch._END:
            self.close()
            raise StopIteration
        if isinstance(item, Exception):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (at most one batch transfer later); later `next()` calls end."""
        if self._thread is not None:
            self._stop.set()

    def __del__(self):
        self.close()
