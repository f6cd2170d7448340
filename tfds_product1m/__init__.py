"""Product1M: the official files, a synthetic stand-in, and a TensorFlow Datasets builder.

The package imports nothing on its own: reading the official text files
(`tfds_product1m.product1m_files`), region-feature TSVs (`region_features`), generating synthetic
data (`synthetic`) and downloading images (`download`) need no TensorFlow. Importing
`tfds_product1m.tfds_product1m_dataset_builder` registers the TFDS builder, after which
`tfds.builder("tfds_product1m/synthetic_tiny")` works; `tfds build tfds_product1m` finds it by
its folder. Nothing here imports `capture_jax`: the model package stands on this one, not the
other way round.
"""
