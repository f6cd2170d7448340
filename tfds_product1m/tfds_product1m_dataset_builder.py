"""TFDS builder for Product1M (ICCV 2021): the real files, or a synthetic stand-in with no download.

    tfds build tfds_product1m --config=full --manual_dir=DIR [--data_dir=D]
    tfds build tfds_product1m --config=full_regions --manual_dir=DIR [--data_dir=D]
    tfds build tfds_product1m --config=synthetic_tiny [--data_dir=D]

`full` reads the official text files and `<id>.jpg` images from the manual directory.
`full_regions` joins the same rows with detector region features from bottom-up-attention
`*.tsv` files anywhere under the manual directory (`region_features.py`), without images. The
`synthetic*` configs first write a Product1M-format directory (with such TSVs for the `_regions`
ones) with `tfds_product1m.synthetic`, then build it through exactly the same parsing code, so
every test exercises the real path.

Every split's audit (rows read, written, skipped by reason, repaired) is logged when the split is
written and stored in the dataset's `metadata.json` under `build_stats`; the labels of every row of
the labelled text files, read by the official scoring rules, under `ground_truth`. The build ends
with a one-line-per-split table and, for a split that skipped more than 5% of its rows, a WARNING
with the reasons and what to check (`build_report.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import multiprocessing.pool

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.utils.lazy_imports_utils import apache_beam as beam

from . import product1m_files as files
from . import build_report, region_features, synthetic_spec

_MANUAL_INSTRUCTIONS = """\
Product1M cannot be downloaded automatically. To build the `full` config:
  1. Get the four official text files from the Product1M release
     (https://github.com/zhanxlin/Product1M): product1m_train_ossurl_v2.txt,
     product1m_gallery_ossurl_v2.txt, product1m_dev_ossurl_v2.txt, product1m_test_ossurl_v2.txt.
     Any subset works (e.g. gallery/dev/test only); the missing splits are not built.
  2. Download the images (both URLs of each row, resumable, with a report of what failed):
       python -m tfds_product1m.download --official_dir TEXT_FILES_DIR --out THAT_DIR
     It copies the text files into THAT_DIR too. (Images from another script work as well: each
     saved as <id>.jpg anywhere below THAT_DIR, with the text files at its top.)
  3. tfds build tfds_product1m --config=full --manual_dir=THAT_DIR --data_dir=YOUR_DATA_DIR
For --config=full_regions, put your bottom-up-attention feature files (*.tsv, one line per image:
image_id image_w image_h num_boxes boxes features, the ids being the Product1M ids) anywhere under
the same directory; the images are then not needed.
No download at all: --config=synthetic (or synthetic_tiny) builds a Product1M-shaped synthetic set.
"""


@dataclasses.dataclass
class Product1MConfig(tfds.core.BuilderConfig):
    """A build of Product1M.

    Attributes:
      max_image_side: images are down-scaled (never up-scaled) so the longer side is at most this.
      synthetic: if set, the raw directory is generated with this spec instead of read from
        `--manual_dir`.
      max_workers: image decoding runs in up to this many threads (capped at the CPU count)
        when not building with Beam. The output does not depend on it.
      region_features: join every row with its detector regions from the `*.tsv` files under
        the data directory (`region_features.py`); rows without a decodable line are skipped.
        Stored per row as `regions`: `features` float16 [n, feature_dim] (half of float32's
        size), `boxes` float32 [n, 4] (x1, y1, x2, y2 in pixels), `image_width`/`image_height`
        (the image the boxes refer to). n is what the file holds (the input pipeline pads or
        truncates to the model's region count).
      feature_dim: width of the region features (2048 for the bottom-up-attention ResNet-101).
      with_image: store the image. Region users often have no pixels: then images are neither
        needed nor looked for.
    """

    max_image_side: int = 256
    synthetic: synthetic_spec.SyntheticSpec | None = None
    max_workers: int = 16
    region_features: bool = False
    feature_dim: int = 2048
    with_image: bool = True


# Below this many rows a split is cleaned in-process: a pool's start-up would cost more.
_MIN_ROWS_FOR_POOL = 256


class Builder(tfds.core.GeneratorBasedBuilder):
    """Product1M image-title pairs; gallery/dev/test rows carry instance labels."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: real and synthetic configs, audited cleaning.",
        "1.1.0": "metadata.json keeps the official ground truth of gallery/dev/test (every row of "
                 "the text files, also those skipped for a missing image), for exact scores.",
    }
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
        Product1MConfig(
            name="full_regions",
            description="The real Product1M rows with detector region features (*.tsv files in "
                        "--manual_dir), no images.",
            region_features=True,
            with_image=False,
        ),
        Product1MConfig(
            name="synthetic_regions",
            description="The `synthetic` rows with stand-in detector region features, no images.",
            synthetic=synthetic_spec.REGIONS,
            region_features=True,
            feature_dim=synthetic_spec.REGIONS.feature_dim,
            with_image=False,
        ),
        Product1MConfig(
            name="synthetic_regions_tiny",
            description="The `synthetic_tiny` rows with 24-d stand-in region features, for tests.",
            synthetic=synthetic_spec.TINY_REGIONS,
            max_image_side=synthetic_spec.TINY_REGIONS.image_size,
            region_features=True,
            feature_dim=synthetic_spec.TINY_REGIONS.feature_dim,
            with_image=False,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        if not (config.with_image or config.region_features):
            raise ValueError(f"Config {config.name} stores neither images nor region features: "
                             "set with_image or region_features.")
        features = {
            "id": tfds.features.Text(doc="Item id (decimal string, unique within a split)."),
            "title": tfds.features.Text(doc="Chinese e-commerce title; may be empty."),
            "labels": tfds.features.Sequence(
                tfds.features.Text(),
                doc="Instance labels, order and duplicates kept; empty for train.",
            ),
            "original_width": tfds.features.Scalar(np.int32, doc="Width before down-scaling."),
            "original_height": tfds.features.Scalar(np.int32, doc="Height before down-scaling."),
        }
        if config.with_image:
            features["image"] = tfds.features.Image(
                shape=(None, None, 3),
                encoding_format="jpeg",
                doc="Upright RGB JPEG, longer side <= config.max_image_side.",
            )
        if config.region_features:
            features["regions"] = tfds.features.FeaturesDict({
                "features": tfds.features.Tensor(
                    shape=(None, config.feature_dim), dtype=np.float16,
                    encoding=tfds.features.Encoding.BYTES,
                    doc="Detector region features (float16), in the TSV's order."),
                "boxes": tfds.features.Tensor(
                    shape=(None, 4), dtype=np.float32,
                    doc="x1, y1, x2, y2 in pixels of image_width x image_height."),
                "image_width": tfds.features.Scalar(np.int32, doc="Width the boxes refer to."),
                "image_height": tfds.features.Scalar(np.int32, doc="Height the boxes refer to."),
            })
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            supervised_keys=None,
            homepage="https://github.com/zhanxlin/Product1M",
            metadata=tfds.core.MetadataDict(),
        )

    def _download_and_prepare(self, dl_manager, download_config=None):
        # Beam is used only when asked for (--beam_pipeline_options / beam_runner); remember which.
        self._use_beam = bool(
            download_config and (download_config.beam_options or download_config.beam_runner)
        )
        self._beam_skips = None
        # Progress bars only on a terminal: redirected to a file they are `\r`-mangled lines.
        with build_report.progress_bars_only_on_a_terminal():
            result = super()._download_and_prepare(dl_manager, download_config)
        self._log_build_summary()
        return result

    def _process_pipeline_result(self, pipeline_result) -> None:
        """Beam: keeps the image/region skip counters (`_beam_load`) for the build summary."""
        try:
            counters = pipeline_result.metrics().query(
                beam.metrics.MetricsFilter().with_namespace("product1m"))["counters"]
        except Exception as e:  # pylint: disable=broad-except  # Not every runner has metrics.
            logging.info("Product1M: no Beam counters from the runner (%s).", e)
            return
        skips = {}
        for counter in counters:
            split, _, reason = counter.key.metric.name.partition("/")
            if reason in files.SKIP_REASONS:
                count = counter.committed if counter.committed is not None else counter.attempted
                skips.setdefault(split, {})[reason] = skips.get(split, {}).get(reason, 0) + count
        self._beam_skips = skips

    def _log_build_summary(self) -> None:
        """The table at the end of the build, and a WARNING per split that skipped > 5%."""
        stats, audits = self.info.metadata.get("build_stats", {}), {}
        for split in self.info.metadata.get("splits_built", []):
            audit = stats.get(split)
            if audit is not None and getattr(self, "_use_beam", False):
                audit = self._beam_audit(split, audit)
            audits[split] = audit
        spec, expected = self.builder_config.synthetic, set()
        if spec is not None and spec.dirty:  # Its dirty rows are skipped on purpose.
            expected = {s for s, a in audits.items()
                        if a is not None and a["written"] == spec.split_rows(s)}
        build_report.log_build_summary(self.info.full_name, audits, expected, self._found())

    def _found(self) -> dict[str, str]:
        """What the build saw that bears on a skip reason (`build_report.skip_warning`)."""
        metadata, root = self.info.metadata, getattr(self, "_root", "the manual directory")
        found = {"missing_image": f"found {metadata.get('image_index', {}).get('files', 0):,} "
                                  f"<id>.jpg files under {root}"}
        if "region_index" in metadata:
            index = metadata["region_index"]
            found["missing_regions"] = (f"indexed {index.get('indexed', 0):,} ids in "
                                        f"{index.get('files', 0):,} *.tsv files under {root}")
        return found

    def _beam_audit(self, split: str, audit: dict) -> dict | None:
        """A Beam split's audit for the summary: the launcher's row-level counts, the written
        count TFDS measured, and the workers' counters (not stored in metadata.json)."""
        if split not in self.info.splits:
            return None
        audit = dict(audit, skipped=dict(audit["skipped"]), fixed={}, blank_lines=0)
        audit["written"] = self.info.splits[split].num_examples
        dropped = audit["rows_read"] - sum(audit["skipped"].values()) - audit["written"]
        for reason, count in ((self._beam_skips or {}).get(split) or {}).items():
            audit["skipped"][reason] += count
            dropped -= count
        if dropped > 0:  # The runner reported no (or not all) counters.
            audit["skipped"]["image_or_region_checks"] = dropped
        return audit

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        if config.synthetic is not None:
            root = _write_synthetic_raw(dl_manager.download_dir, config)
        else:
            root = dl_manager.manual_dir  # Raises TFDS's manual-download message when missing.
        self._root = root  # For the build summary.
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
        image_index, duplicate_names = {}, 0
        if config.with_image:
            image_index, duplicate_names = files.index_images(root)
            logging.info(
                "Product1M: indexed %d images under %s (%d duplicate file names ignored).",
                len(image_index),
                root,
                duplicate_names,
            )
        region_index = self._index_regions(root, split_paths) if config.region_features else None
        metadata = self.info.metadata
        metadata["source"] = "synthetic" if config.synthetic else "manual_dir"
        if config.synthetic:
            metadata["synthetic_spec"] = dataclasses.asdict(config.synthetic)
        metadata["splits_built"] = list(split_paths)
        metadata["splits_missing"] = missing
        metadata["image_index"] = {"files": len(image_index), "duplicate_names": duplicate_names}
        metadata.setdefault("build_stats", {})
        metadata["ground_truth"] = _official_ground_truth(split_paths)
        return {
            split: self._generate_examples(split, path, image_index, region_index)
            for split, path in split_paths.items()
        }

    def _index_regions(self, root, split_paths: dict[str, str]) -> dict:
        """{id: (tsv path, offset)} of every `*.tsv` under `root`; checks the feature width."""
        config = self.builder_config
        tsv_files = region_features.find_tsv_files(root)
        if not tsv_files:
            raise FileNotFoundError(
                f"No region feature file (*.tsv) found under {root}: put the bottom-up-attention "
                "TSV files of the Product1M images there, or build the `full` config (images).")
        # One pass over every byte, bound by the disk, so in-process (no fork of a process
        # that may already run JAX/TF threads). The index holds ids and offsets, not features.
        index, stats = region_features.index_tsv_files(tsv_files)
        logging.info("Product1M: indexed region features of %d images in %d TSV files under %s "
                     "(%s).", stats.indexed, stats.files, root, json.dumps(stats.to_json()))
        self.info.metadata["region_index"] = stats.to_json()
        ids = (row.id for split, path in split_paths.items()
               for row in files.read_split_file(path, split)[0][:50])
        dim, where = region_features.probe_feature_dim(index, ids)
        if dim is not None and dim != config.feature_dim:
            raise ValueError(
                f"The region features in {where} are {dim}-d but config {config.name} expects "
                f"{config.feature_dim}-d: use features from a {config.feature_dim}-d detector "
                "(bottom-up-attention ResNet-101), or a config with that feature_dim.")
        return index

    def _generate_examples(self, split: str, path: str, image_index: dict[str, str],
                           region_index: dict | None = None):
        rows, stats = files.read_split_file(path, split)
        config = self.builder_config
        pairs = [(row, image_index.get(row.id),
                  None if region_index is None else region_index.get(row.id)) for row in rows]
        load = _Loader(config.max_image_side, config.with_image, config.region_features,
                       config.feature_dim)
        if getattr(self, "_use_beam", False):
            # Row-level counts are final here; image-level ones are Beam counters on the workers.
            self.info.metadata["build_stats"][split] = dict(
                stats.to_json(), image_checks="beam counters product1m:<split>/<reason>"
            )
            return (
                f"Create_{split}" >> beam.Create(pairs)
                | f"Reshuffle_{split}" >> beam.Reshuffle()
                | f"Load_{split}" >> beam.FlatMap(functools.partial(_beam_load, split, load))
            )
        return self._generate_local(split, pairs, stats, load)

    def _generate_local(self, split, pairs, stats: files.SplitStats, load: "_Loader"):
        workers = min(multiprocessing.cpu_count(), self.builder_config.max_workers)
        if workers > 1 and len(pairs) >= _MIN_ROWS_FOR_POOL:
            # Image decoding dominates, and Pillow releases the GIL while it decodes, resizes
            # and encodes, so threads scale. Not processes: a fork taken after TF and JAX
            # started their threads can inherit a held lock and hang (it hung the demo's build),
            # and spawn/forkserver workers re-run the caller's main module.
            pool = multiprocessing.pool.ThreadPool(workers)
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
        logging.info("%s", build_report.split_line(split, summary))
        if not stats.written:  # Else TFDS fails with "No examples were yielded", saying no why.
            raise ValueError(build_report.empty_split_error(split, summary, self._found()))


# TFDS's "Variant folder .../tfds_product1m/<config>/<version> has no dataset_info.json" WARNING,
# logged whenever a not yet built config is asked `is_prepared()`, says nothing to act on.
build_report.install_not_built_yet_filter(Builder.name)


@dataclasses.dataclass(frozen=True)
class _Loader:
    """(row, image path, region location) -> (example or None, reasons); picklable for Beam workers."""

    max_side: int
    with_image: bool
    region_features: bool
    feature_dim: int

    def __call__(self, pair):
        row, image_path, location = pair
        if not self.region_features:
            return files.load_example(row, image_path, self.max_side)
        return region_features.load_row(row, image_path, location, max_side=self.max_side,
                                        with_image=self.with_image, feature_dim=self.feature_dim)


def _beam_load(split: str, load: _Loader, pair):
    """Beam worker: one row to zero or one example, counting what happened."""
    example, reasons = load(pair)
    for reason in reasons:
        beam.metrics.Metrics.counter("product1m", f"{split}/{reason}").inc()
    if example is not None:
        yield example.key, example.features


def _official_ground_truth(split_paths: dict[str, str]) -> dict:
    """{split: {"labels": {id: [labels]}, ...}} of the labelled splits, read by the official
    scoring rules (`files.read_official_labels`). Retrieval is scored against this, so rows the
    build skipped (no image) still count as positives nobody can retrieve, as in the official
    script, and in-run scores equal `python -m capture_jax.metrics` on the same files."""
    out = {}
    for split, path in split_paths.items():
        if files.is_labelled(split):
            table = files.read_official_labels(path)
            out[split] = {"labels": {k: list(v) for k, v in table.labels.items()},
                          "unusable_lines": table.unusable_lines,
                          "repeated_ids": table.repeated_ids, "padded": table.padded}
    return out


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
