"""Ordinary mistakes give one `error: ...` line naming the bad value and a non-zero exit status,
never a traceback: each case run as a user runs it, in a subprocess."""
import os
import re
import subprocess
import sys

import pytest

import xla_env

ROOT = xla_env.ROOT
_LOG_LINE = re.compile(r"^[IWE]\d{4} ")  # absl's INFO / WARNING lines


def _run(*args, cwd=ROOT):
  env = xla_env.subprocess_env(1)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, timeout=300,
                        capture_output=True, text=True)


def _error_lines(proc) -> list[str]:
  """stderr + stdout without absl's log lines."""
  text = proc.stderr + proc.stdout
  return [line for line in text.splitlines() if line.strip() and not _LOG_LINE.match(line)]


def _assert_one_error(proc, *fragments, status=1):
  lines = _error_lines(proc)
  assert proc.returncode == status, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]) + "\n")
  return str(path)


def test_wrong_checkpoint_path(tmp_path):
  proc = _run("main.py", "--mode", "eval", "--config", "configs/tiny.py", "--workdir",
              str(tmp_path / "eval"), "--checkpoint", str(tmp_path / "no_such_run"))
  _assert_one_error(proc, "--checkpoint", "no_such_run", "no such directory")


def test_missing_vocab_names_the_field_and_where_relative_paths_resolve(tmp_path):
  proc = _run("main.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
              "--config.data.vocab_path=missing/vocab.txt")
  _assert_one_error(proc, "config.data.vocab_path", "missing/vocab.txt", ROOT)


def test_workdir_that_is_a_file(tmp_path):
  workdir = tmp_path / "notes.txt"
  workdir.write_text("not a directory")
  proc = _run("main.py", "--config", "configs/tiny.py", "--workdir", str(workdir))
  _assert_one_error(proc, "--workdir", "notes.txt", "is a file")


def test_data_glob_that_matches_nothing_names_the_field(tmp_path, vocab):
  proc = _run("main.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
              f"--config.data.vocab_path={vocab}",
              "--config.data.image_text.files=('/no/such/dir/*.jsonl',)",
              "--config.data.regions.files=('/no/such/dir/*.jsonl',)")
  _assert_one_error(proc, "config.data.image_text.files", "/no/such/dir/*.jsonl",
                    "matches no file")


def test_config_check_that_fails_before_compiling(tmp_path, vocab):
  proc = _run("main.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
              f"--config.data.vocab_path={vocab}")
  _assert_one_error(proc, "config.data.", "files is empty")


def test_missing_config_file(tmp_path):
  proc = _run("main.py", "--config", str(tmp_path / "run" / "config.json"), "--workdir",
              str(tmp_path / "run"))
  _assert_one_error(proc, "--config", "config.json", "no such file")


def test_eval_without_evaluators(tmp_path, vocab):
  (tmp_path / "params").mkdir()  # the check comes before anything is loaded
  proc = _run("main.py", "--mode", "eval", "--config", "configs/tiny.py", "--workdir",
              str(tmp_path / "eval"), "--checkpoint", str(tmp_path / "params"),
              f"--config.data.vocab_path={vocab}")
  _assert_one_error(proc, "config.evals is empty")


def test_validate_data_glob_that_matches_nothing(vocab):
  proc = _run("tools/validate_data.py", "--task", "image_text", "--files", "/no/such/*.jsonl",
              "--vocab", vocab)
  _assert_one_error(proc, "--files", "/no/such/*.jsonl", "matches no file", status=2)


def test_x2vlm_command_unknown_and_help():
  proc = _run("-m", "x2vlm_jax.command", "trian")
  assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _run("-m", "x2vlm_jax.command", "--help")
  assert proc.returncode == 0
  for command in ("train", "eval", "convert", "predict", "embed"):
    assert f"\n  {command} " in proc.stdout


def test_checkpoint_of_another_size_is_a_short_report(tmp_path, vocab):
  """A params dir of a wider model given to a tool whose config is tiny: a summary line first
  (counts and the fields the checkpoint implies), each differing parameter once, no traceback."""
  import flax.linen as nn
  import jax
  from PIL import Image

  from x2vlm_jax import checkpoint, tasks
  from x2vlm_jax.configs_loader import load_config
  from x2vlm_jax.models import x2vlm

  wide = load_config(f"configs/tiny.py:data.vocab_path={vocab},model.vision_width=64,"
                     "model.vision_heads=4,model.vision_mlp_dim=128")
  model = tasks.build_model(wide)
  params = jax.device_get(nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"]))
  checkpoint.save_params(tmp_path / "wide", params, config=wide)
  Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")

  proc = _run("-m", "x2vlm_jax.command", "predict", "retrieve", "--checkpoint",
              str(tmp_path / "wide"), "--config", f"configs/tiny.py:data.vocab_path={vocab}",
              "--image", str(tmp_path / "red.png"), "--query", "a cat")
  lines = _error_lines(proc)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[0].startswith("error: checkpoint ") and "does not match config.model" in lines[0]
  assert "shape mismatches" in lines[0] and "model.vision_width=64 (config: 32)" in lines[0]
  assert len(lines) <= 25 and len(proc.stderr) < 4000, proc.stderr
