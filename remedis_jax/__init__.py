"""remedis-jax: REMEDIS-style self-supervised pretraining of medical-imaging models in JAX/Flax."""
