"""x2vlm_jax: X2-VLM (multi-grained vision-language pretraining) in JAX/Flax."""
