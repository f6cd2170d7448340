"""Product1M for TensorFlow Datasets.

Importing the package registers the builder, so `tfds.builder("tfds_product1m/synthetic_tiny")`
works afterwards. The generator (`tfds_product1m.synthetic`), the file reader
(`tfds_product1m.product1m_files`) and the region-feature TSV reader
(`tfds_product1m.region_features`) are usable without building anything.
"""

from tfds_product1m import tfds_product1m_dataset_builder as _builder

Builder = _builder.Builder
