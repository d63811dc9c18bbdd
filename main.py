"""x2vlm_jax command line: training (pre-training or fine-tuning) and evaluation.

  python main.py --config configs/demo.py --workdir runs/demo
  python main.py --config configs/x2vlm_base.py --workdir runs/base --config.train.total_steps=1000
  python main.py --mode eval --config configs/demo.py --workdir runs/demo_eval --checkpoint runs/demo

Config files are ml_collections files (`--config path.py[:arg]`); any field can be overridden with
`--config.a.b=value`. The config is locked: a misspelt field fails here, before anything compiles.
Multi-process runs call `jax.distributed.initialize` from --coordinator_address /
--num_processes / --process_id, or with --distributed from the cluster's environment (README,
"Scaling out").
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard.")
flags.DEFINE_enum("mode", "train", ["train", "pretrain", "finetune", "eval"],
                  "train (pretrain and finetune are the same: the config's tasks say what is "
                  "trained) or eval (the config's evaluators on --checkpoint).")
flags.DEFINE_string("checkpoint", None, "--mode eval: an Orbax params dir or a training workdir "
                    "(latest checkpoint); default: --workdir's latest checkpoint.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_string("compilation_cache", None,
                    "Directory of JAX's persistent compilation cache (a rerun skips compiling: the "
                    "demo starts in ~11 s instead of ~31 s); default $JAX_COMPILATION_CACHE_DIR, "
                    "else ~/.cache/x2vlm_jax/jax; '' turns it off.")
flags.DEFINE_bool("distributed", False, "Multi-process with the flags above taken from the "
                  "cluster's environment (TPU pod slices, SLURM, Open MPI).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
  """Keeps WARNING+ from orbax/grain/jax internals; their INFO chatter drowns the progress lines."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/jax/", "/etils/"))
    return record.levelno >= logging.WARNING or not noisy


def _config_spec(argv) -> str | None:
  """The `configs/NAME.py[:arg]` given with --config=SPEC or --config SPEC."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_override(argv) -> str | None:
  """The message for the first `--config.a.b=v` naming no field of the config, else None."""
  spec = _config_spec(argv)
  if spec is None:
    return None
  from configs import common
  from x2vlm_jax.configs_loader import load_config
  config = load_config(spec)
  for arg in argv:
    if arg.startswith("--config."):
      problem = common.unknown_field(config, arg[len("--config."):].split("=", 1)[0])
      if problem:
        return f"main.py: {arg}: the config ({spec}) has {problem}"
  return None


def _parse_flags(argv):
  """absl flag parsing, with a one-line error for an override of a field the config lacks."""
  try:
    return FLAGS(argv)
  except flags.Error as error:  # a bad value or a missing flag: absl's own message, no traceback
    sys.exit(f"FATAL Flags parsing error: {error}\nPass --helpshort or --helpfull to see help on "
             "flags.")
  except (AttributeError, KeyError):
    message = _unknown_override(argv[1:])
    if message is None:
      raise
    sys.exit(message)


def main(argv):
  del argv
  from absl import logging as absl_logging
  import jax

  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  cache = FLAGS.compilation_cache
  if cache is None:
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "x2vlm_jax", "jax")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes:
    # Cross-process collectives of the CPU backend (tests, CPU clusters); GPU/TPU use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info("JAX process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  config = FLAGS.config
  os.makedirs(FLAGS.workdir, exist_ok=True)
  from x2vlm_jax import cli

  if FLAGS.mode == "eval":
    cli.evaluate(config, FLAGS.workdir, FLAGS.checkpoint)
  else:
    cli.train(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
