"""capture_jax: CAPTURE (vision-language product retrieval on Product1M) in JAX/Flax NNX."""
