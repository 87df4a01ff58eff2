"""bcl_jax: backward-compatible representation learning for image retrieval."""
