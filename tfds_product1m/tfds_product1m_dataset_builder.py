"""TFDS builder for Product1M (ICCV 2021): the real files, or a synthetic stand-in with no download.

    tfds build tfds_product1m --config=full --manual_dir=DIR [--data_dir=D]
    tfds build tfds_product1m --config=synthetic_tiny [--data_dir=D]

`full` reads the official text files and `<id>.jpg` images from the manual directory. `synthetic`
and `synthetic_tiny` first write a Product1M-format directory with `tfds_product1m.synthetic`, then
build it through exactly the same parsing code, so every test exercises the real path.

Every split's audit (rows read, written, skipped by reason, repaired) is logged at the end of the
build and stored in the dataset's `metadata.json` under `build_stats`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.utils.lazy_imports_utils import apache_beam as beam

from . import product1m_files as files
from . import synthetic_spec

_MANUAL_INSTRUCTIONS = """\
Product1M cannot be downloaded automatically. To build the `full` config:
  1. Get the four official text files from the Product1M release
     (https://github.com/zhanxlin/Product1M): product1m_train_ossurl_v2.txt,
     product1m_gallery_ossurl_v2.txt, product1m_dev_ossurl_v2.txt, product1m_test_ossurl_v2.txt.
     Any subset works (e.g. gallery/dev/test only); the missing splits are not built.
  2. Download the images with a community download script so that each is saved as <id>.jpg;
     any folder layout under the manual directory is fine (images/<id>.jpg, data/<split>/xx/<id>.jpg).
  3. Put the text files at the top of one directory with the images below it, and run
       tfds build tfds_product1m --config=full --manual_dir=THAT_DIR --data_dir=YOUR_DATA_DIR
No download at all: --config=synthetic (or synthetic_tiny) builds a Product1M-shaped synthetic set.
"""


@dataclasses.dataclass
class Product1MConfig(tfds.core.BuilderConfig):
    """A build of Product1M.

    Attributes:
      max_image_side: images are down-scaled (never up-scaled) so the longer side is at most this.
      synthetic: if set, the raw directory is generated with this spec instead of read from
        `--manual_dir`.
      max_workers: image decoding runs in up to this many processes (capped at the CPU count)
        when not building with Beam. The output does not depend on it.
    """

    max_image_side: int = 256
    synthetic: synthetic_spec.SyntheticSpec | None = None
    max_workers: int = 16


# Below this many rows a split is cleaned in-process: a pool's start-up would cost more.
_MIN_ROWS_FOR_POOL = 256


class Builder(tfds.core.GeneratorBasedBuilder):
    """Product1M image-title pairs; gallery/dev/test rows carry instance labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: real and synthetic configs, audited cleaning."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = [
        Product1MConfig(name="full", description="The real Product1M from --manual_dir."),
        Product1MConfig(
            name="synthetic",
            description="Synthetic Product1M-shaped data (about 100 products), no download.",
            synthetic=synthetic_spec.SyntheticSpec(),
        ),
        Product1MConfig(
            name="synthetic_tiny",
            description="A few dozen synthetic products, for tests.",
            synthetic=synthetic_spec.TINY,
            max_image_side=synthetic_spec.TINY.image_size,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(doc="Item id (decimal string, unique within a split)."),
                "title": tfds.features.Text(doc="Chinese e-commerce title; may be empty."),
                "image": tfds.features.Image(
                    shape=(None, None, 3),
                    encoding_format="jpeg",
                    doc="Upright RGB JPEG, longer side <= config.max_image_side.",
                ),
                "labels": tfds.features.Sequence(
                    tfds.features.Text(),
                    doc="Instance labels, order and duplicates kept; empty for train.",
                ),
                "original_width": tfds.features.Scalar(np.int32, doc="Width before down-scaling."),
                "original_height": tfds.features.Scalar(np.int32, doc="Height before down-scaling."),
            }),
            supervised_keys=None,
            homepage="https://github.com/zhanxlin/Product1M",
            metadata=tfds.core.MetadataDict(),
        )

    def _download_and_prepare(self, dl_manager, download_config=None):
        # Beam is used only when asked for (--beam_pipeline_options / beam_runner); remember which.
        self._use_beam = bool(
            download_config and (download_config.beam_options or download_config.beam_runner)
        )
        return super()._download_and_prepare(dl_manager, download_config)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        if config.synthetic is not None:
            root = _write_synthetic_raw(dl_manager.download_dir, config)
        else:
            root = dl_manager.manual_dir  # Raises TFDS's manual-download message when missing.
        split_paths = files.find_split_files(root)
        if not split_paths:
            raise FileNotFoundError(
                f"No Product1M split file found in {root}: expected at least one of "
                f"{', '.join(files.split_filename(s) for s in files.SPLITS)} at its top level."
            )
        missing = [s for s in files.SPLITS if s not in split_paths]
        logging.info(
            "Product1M: building splits %s from %s%s.",
            list(split_paths),
            root,
            f" (no file for {missing}, not built)" if missing else "",
        )
        image_index, duplicate_names = files.index_images(root)
        logging.info(
            "Product1M: indexed %d images under %s (%d duplicate file names ignored).",
            len(image_index),
            root,
            duplicate_names,
        )
        metadata = self.info.metadata
        metadata["source"] = "synthetic" if config.synthetic else "manual_dir"
        if config.synthetic:
            metadata["synthetic_spec"] = dataclasses.asdict(config.synthetic)
        metadata["splits_built"] = list(split_paths)
        metadata["splits_missing"] = missing
        metadata["image_index"] = {"files": len(image_index), "duplicate_names": duplicate_names}
        metadata.setdefault("build_stats", {})
        return {
            split: self._generate_examples(split, path, image_index)
            for split, path in split_paths.items()
        }

    def _generate_examples(self, split: str, path: str, image_index: dict[str, str]):
        rows, stats = files.read_split_file(path, split)
        pairs = [(row, image_index.get(row.id)) for row in rows]
        max_side = self.builder_config.max_image_side
        if getattr(self, "_use_beam", False):
            # Row-level counts are final here; image-level ones are Beam counters on the workers.
            self.info.metadata["build_stats"][split] = dict(
                stats.to_json(), image_checks="beam counters product1m:<split>/<reason>"
            )
            return (
                f"Create_{split}" >> beam.Create(pairs)
                | f"Reshuffle_{split}" >> beam.Reshuffle()
                | f"Load_{split}" >> beam.FlatMap(functools.partial(_beam_load, split, max_side))
            )
        return self._generate_local(split, pairs, stats, max_side)

    def _generate_local(self, split, pairs, stats: files.SplitStats, max_side: int):
        load = functools.partial(_load_pair, max_side)
        workers = min(multiprocessing.cpu_count(), self.builder_config.max_workers)
        if workers > 1 and len(pairs) >= _MIN_ROWS_FOR_POOL:
            # Image decoding dominates; workers need only PIL, so forking after TF loaded is safe.
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(load, pairs, chunksize=32)
        else:
            pool, results = None, map(load, pairs)
        try:
            for example, reasons in results:
                if example is None:
                    stats.skipped[reasons[0]] += 1
                    continue
                stats.fixed.update(reasons)
                stats.written += 1
                yield example.key, example.features
        finally:
            if pool is not None:
                pool.terminate()
        summary = stats.to_json()
        self.info.metadata["build_stats"][split] = summary
        logging.info("Product1M %s: %s", split, json.dumps(summary, ensure_ascii=False))


def _load_pair(max_side: int, pair):
    row, image_path = pair
    return files.load_example(row, image_path, max_side)


def _beam_load(split: str, max_side: int, pair):
    """Beam worker: one row to zero or one example, counting what happened."""
    example, reasons = _load_pair(max_side, pair)
    for reason in reasons:
        beam.metrics.Metrics.counter("product1m", f"{split}/{reason}").inc()
    if example is not None:
        yield example.key, example.features


def _write_synthetic_raw(download_dir, config: Product1MConfig) -> epath.Path:
    """Writes (once) the raw Product1M-format directory for a synthetic config."""
    spec = config.synthetic
    spec_json = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    fingerprint = hashlib.sha256(spec_json.encode()).hexdigest()[:12]
    root = epath.Path(download_dir) / "synthetic_raw" / f"{config.name}-{fingerprint}"
    marker = root / "_COMPLETE"
    if not marker.exists():
        from . import synthetic  # The renderer is needed only here.

        logging.info("Product1M: writing synthetic raw files (%s) to %s", spec, root)
        synthetic.write_product1m(root, spec)
        marker.write_text(spec_json)
    return root
