"""Training (pre-training or fine-tuning) and evaluation from the command line: `python main.py`
and `x2vlm train|eval` run this program.

  python main.py --config configs/demo.py --workdir runs/demo
  x2vlm train --config configs/demo.py --workdir runs/demo                     # the same
  python main.py --config configs/x2vlm_base.py --workdir runs/base --config.train.total_steps=1000
  python main.py --mode eval --config runs/demo --workdir runs/demo_eval --checkpoint runs/demo

`--config` is an ml_collections config file (`path.py[:arg]`), a saved `config.json[:arg]` or a
directory holding one (a training workdir, a converted params dir: `saved_config.py`); any field
can be overridden with `--config.a.b=value`. The config is locked: a misspelt field fails here,
before anything compiles.
Multi-process runs call `jax.distributed.initialize` from --coordinator_address /
--num_processes / --process_id, or with --distributed from the cluster's environment (README,
"Scaling out"). A user's mistake (`errors.InputError`, a missing file) is one `error: ...` line and
exit status 1.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from x2vlm_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "configs/NAME.py[:arg], a saved config.json[:arg], or a training workdir / "
    "params dir (its config.json).", lock_config=True)
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


def _saved_config_spec(argv: list[str]) -> list[str]:
  """argv with `--config DIR` / `--config FILE.json[:arg]` turned into the config file that reads
  a saved config (`saved_config.py:SPEC`), which `config_flags` can load."""
  from x2vlm_jax import saved_config
  from x2vlm_jax.configs_loader import is_saved_config

  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      spec, at, prefix = arg.split("=", 1)[1], i, "--config="
    elif arg == "--config" and i + 1 < len(out):
      spec, at, prefix = out[i + 1], i + 1, ""
    else:
      continue
    if is_saved_config(spec.partition(":")[0]):
      out[at] = f"{prefix}{saved_config.__file__}:{spec}"
    break
  return out


def _parse_flags(argv):
  """absl flag parsing, with a one-line error for an override of a field the config lacks."""
  spec = _config_spec(argv[1:])
  if spec is not None and not os.path.exists(spec.partition(":")[0]):
    sys.exit(f"error: --config {spec.partition(':')[0]}: no such file or directory (a config "
             "file configs/NAME.py, a saved config.json, or a workdir / params dir holding one)")
  argv = _saved_config_spec(argv)
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
  except errors.REPORTED as error:  # e.g. a saved config that is not one
    sys.exit(f"error: --config: {error}")


def main(argv):
  del argv
  try:
    _main()
  except errors.REPORTED as error:
    sys.exit(f"error: {error}")


def _main():
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
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    raise errors.InputError(f"--workdir {FLAGS.workdir} is a file: give a directory (it is made "
                            "if missing)")
  if FLAGS.mode == "eval" and FLAGS.checkpoint and not os.path.isdir(FLAGS.checkpoint):
    raise errors.InputError(f"--checkpoint {FLAGS.checkpoint}: no such directory (a training "
                            "workdir, its checkpoints/<step>, or a params dir from "
                            "tools/convert_checkpoint.py)")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  from x2vlm_jax import cli

  if FLAGS.mode == "eval":
    cli.evaluate(config, FLAGS.workdir, FLAGS.checkpoint)
  else:
    cli.train(config, FLAGS.workdir)


def run(argv: list[str] | None = None) -> None:
  """Parses `argv` (default sys.argv) and runs; exits with status 0 or 1 (a reported error)."""
  app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
