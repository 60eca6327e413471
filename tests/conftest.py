"""Test configuration: strict rank promotion catches `w[T] * g[T, D]` broadcasting bugs."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
