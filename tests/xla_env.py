"""XLA settings of the test session, shared by conftest.py and the tests that start subprocesses.

* `--xla_backend_optimization_level=0`: LLVM compiles the CPU kernels without its optimisation
  passes. Compiling a tiny train step takes about 22 s instead of 49 s here and the suite is
  dominated by compilation; the kernels compute the same IEEE float32 results (no fast-math at
  either level), so every tolerance in the tests still holds. Benchmarks and real runs keep XLA's
  default level: nothing outside tests/ sets this flag.
* A persistent compilation cache in `<repo>/.jax_cache` (git-ignored), passed to subprocesses
  through the environment, so that runs of the same step in other tests or processes load it.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, ".jax_cache")
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS for a test process with `num_devices` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE_FLAGS}"


def subprocess_env(num_devices: int = 1, cache: bool = True) -> dict[str, str]:
  """The environment of a subprocess (main.py, a tool, a worker): CPU, `num_devices` devices,
  the test compile flags and (unless `cache` is False: processes that compile the same program
  at the same moment would write the same cache file at once) the shared compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(num_devices))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  return env
