"""Test session setup: 8 simulated CPU devices, fast-compile XLA flags and a persistent
compilation cache (tests/xla_env.py says why).

All of it must happen before JAX initialises its backend, so it lives here (imported first by
pytest). Subprocesses get the same settings from `xla_env.subprocess_env`.
"""
import os

import xla_env

os.environ.setdefault("XLA_FLAGS", xla_env.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", xla_env.CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
