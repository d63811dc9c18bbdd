"""The releases table, the converter's command line (`--list`, `--release`, errors) and the
mismatch report of a checkpoint that does not fit its config."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import xla_env
from x2vlm_jax import convert, convert_tool, errors, releases

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pretrain_tiny")
CHECKPOINT = os.path.join(FIXTURE, "checkpoint.th")
VOCAB = os.path.join(FIXTURE, "vocab.txt")
FIXTURE_CONFIG = "configs/fixture_tiny.py"  # the fixture's sizes (its manifest.json)


def _sha256(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _table(sha256=None, config=FIXTURE_CONFIG):
  """A release table holding only the fixture (the real table is not touched)."""
  return (releases.Release("tiny_fixture", "pre-training (test fixture)",
                           "file://" + CHECKPOINT, "tests/fixtures", config, 64, "~1 MB",
                           sha256=sha256),)


def _run(argv, table=None):
  return convert_tool.main(argv, table=table or releases.RELEASES)


# ------------------------------------------------------------------------------ the table
def test_list_prints_every_release_with_its_config(capsys):
  assert _run(["--list"]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert lines[0].split() == ["name", "task", "config", "image_res", "size", "file"]
  for release in releases.RELEASES:
    row = next(line for line in lines if line.startswith(release.name + " "))
    assert release.config in row and release.filename in row and f" {release.image_res} " in row
  assert len(releases.RELEASES) == 12
  assert "x2vlm_ckpts_2release/<file>" in out and "sha256 known for 0 of 12" in out


def test_every_release_config_loads_at_its_image_res():
  from x2vlm_jax.configs_loader import load_config
  for release in releases.RELEASES:
    spec = releases.config_spec(release)
    assert os.path.isabs(spec.partition(":")[0]), spec
    config = load_config(spec)
    assert config.model.image_res == release.image_res, release.name
    assert release.sha256 is None  # the README publishes no checksums: none is made up
  cclm = load_config(releases.config_spec(releases.find("cclm_x2vlm_base")))
  assert (cclm.model.vocab_size, cclm.model.text_layers, cclm.model.mlm_decoder_tied) == (
      250002, 12, False)


def test_config_specs_resolve_against_the_project_root(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  spec = releases.config_spec(releases.find("x2vlm_large_1b_vqa"))
  assert spec == os.path.join(ROOT, "configs", "finetune", "vqa.py") + ":large"


def test_find_names_the_closest_release_and_lists_the_known_ones():
  assert releases.find("x2vlm_large_1b").url.endswith("/x2vlm_large_1b.th")
  with pytest.raises(errors.InputError) as err:
    releases.find("x2vlm_base4m")
  message = str(err.value)
  assert "did you mean x2vlm_base_4m" in message and "cclm_x2vlm_large" in message
  assert "\n" not in message
  with pytest.raises(errors.InputError, match="known releases: tiny_fixture"):
    releases.find("x2vlm_base_4m", _table())


# ------------------------------------------------------------------------------ --release
def test_release_from_a_path_and_a_file_url_gives_a_self_describing_params_dir(tmp_path,
                                                                                 capsys):
  from x2vlm_jax import checkpoint
  from x2vlm_jax.inference import Predictor

  local = str(tmp_path / "downloaded.th")
  shutil.copyfile(CHECKPOINT, local)
  table = _table(sha256=_sha256(CHECKPOINT))
  out = str(tmp_path / "from_path")
  assert _run(["--release", "tiny_fixture", "--from", local, "--vocab", VOCAB,
               "--output", out], table) == 0
  assert "(verified)" in capsys.readouterr().out
  from x2vlm_jax import saved_config
  tokenizer = saved_config.saved_assets(out)[saved_config.TOKENIZER_FIELD]
  assert os.path.dirname(tokenizer).startswith(os.path.abspath(out))
  assert _sha256(tokenizer) == _sha256(VOCAB)
  saved = json.load(open(os.path.join(out, "config.json")))
  assert (saved["model"]["vision_width"], saved["model"]["text_layers"]) == (64, 2)
  predictor = Predictor.load(out)
  features = predictor.embed_texts(["a cat"])
  assert features.shape == (1, 32) and np.isfinite(features).all()
  np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1.0, atol=1e-5)

  from_url = str(tmp_path / "from_url")
  assert _run(["--release", "tiny_fixture", "--from", "file://" + local, "--vocab", VOCAB,
               "--output", from_url], table) == 0
  a, b = (convert.flatten(checkpoint.load_params(d)) for d in (out, from_url))
  assert sorted(a) == sorted(b)
  state = convert.load_torch_state_dict(CHECKPOINT)
  np.testing.assert_array_equal(b["vision/blocks_1/attn/qkv/kernel"],
                                state["vision_encoder.blocks.1.attn.qkv.weight"].T)


def test_a_wrong_sha256_is_one_line_and_writes_nothing(tmp_path, capsys):
  out = tmp_path / "out"
  assert _run(["--release", "tiny_fixture", "--from", CHECKPOINT, "--vocab", VOCAB,
               "--output", str(out)], _table(sha256="0" * 64)) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  assert f"sha256 {_sha256(CHECKPOINT)} differs from the release's {'0' * 64}" in err
  assert not out.exists()


@pytest.mark.parametrize("argv,expected", [
    (["--from", "/no/such/file.th"], "error: checkpoint file /no/such/file.th: no such file"),
    (["--from", "file:///no/such/file.th"], "error: --from file:///no/such/file.th: no such file"),
    (["--from", "ftp://example.com/x.th"], "unsupported URL scheme 'ftp'"),
    (["--from", VOCAB], "not a readable PyTorch checkpoint"),
])
def test_user_mistakes_are_one_line(tmp_path, capsys, argv, expected):
  assert _run(["--release", "tiny_fixture", "--vocab", VOCAB, "--output",
               str(tmp_path / "out"), *argv], _table()) == 1
  err = capsys.readouterr().err
  assert expected in err and err.startswith("error: ") and err.count("\n") == 1


def test_vocab_is_required_when_the_config_has_none(tmp_path, capsys):
  assert _run(["--release", "tiny_fixture", "--from", CHECKPOINT, "--output",
               str(tmp_path / "out")], _table()) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: --vocab is needed") and err.count("\n") == 1


def test_a_tar_archive_names_the_checkpoint_inside(tmp_path, capsys):
  archive = tmp_path / "x2vlm_large_1b_captioning.tar"
  with tarfile.open(archive, "w") as tar:
    tar.add(CHECKPOINT, arcname="captioning/model_state_epoch_4.th")
  assert _run(["--release", "tiny_fixture", "--from", str(archive), "--vocab", VOCAB,
               "--output", str(tmp_path / "out")], _table()) == 1
  err = capsys.readouterr().err
  assert "is a tar archive" in err and "captioning/model_state_epoch_4.th" in err


def test_a_wrong_config_gives_a_short_report(tmp_path, capsys):
  """configs/tiny.py as it is (widths 32, 1 + 1 text layers) for the fixture (64, 2 + 2)."""
  assert _run(["--release", "tiny_fixture", "--from", CHECKPOINT, "--vocab", VOCAB,
               "--config", "configs/tiny.py", "--output", str(tmp_path / "out")], _table()) == 1
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert lines[0].startswith(f"error: checkpoint {CHECKPOINT} does not match config.model: "
                             "10 missing, 52 unexpected, 91 shape mismatches; the checkpoint "
                             "implies model.vision_width=64 (config: 32), model.vision_mlp_dim=256")
  assert "model.text_layers=2 (config: 1), model.fusion_layers=2 (config: 1)" in lines[0]
  assert len(lines) <= 20 and len(err) < 2500
  # 10 + 52 + 91 parameters, each counted on exactly one line of exactly one list.
  counted = {}
  section = None
  for line in lines[1:]:
    if line.startswith("  ") and not line.startswith("    "):
      section = line.split(" (")[0].strip()
      continue
    if line.startswith("    "):
      counted[section] = counted.get(section, 0) + _entries(line.strip())
  assert counted == {"missing from the checkpoint": 10, "unexpected in the checkpoint": 52,
                     "shape mismatches": 91}
  assert ("config.model fields the checkpoint implies: patch_size=16, vision_width=64, "
          "vision_depth=2, vision_heads=2, image_res=64 (config: 32; tables are interpolated), "
          "vision_mlp_dim=256, vocab_size=512") in err
  assert "add to the config's :arg: model.vision_width=64,model.vision_mlp_dim=256," in err


def _entries(line):
  """Entries a report line stands for: '... and 7 more' -> 7, 'text/* (10 params)' -> 10,
  'a_{0-2,5}/b ...' -> 4, a plain line -> 1."""
  if line.startswith("... and "):
    return int(line.split()[2])
  if line.endswith(" params)"):
    return int(line.rsplit("(", 1)[1].split()[0])
  if "{" not in line:
    return 1
  total = 0
  for part in line.split("{")[1].split("}")[0].split(","):
    low, _, high = part.partition("-")
    total += int(high or low) - int(low) + 1
  return total


def test_the_tool_script_reports_a_missing_file_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--checkpoint",
       str(tmp_path / "missing.th"), "--config", "configs/tiny.py", "--vocab", VOCAB,
       "--output", str(tmp_path / "out")],
      cwd=ROOT, env=xla_env.subprocess_env(1), capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 1
  assert result.stderr.splitlines() == [f"error: checkpoint file {tmp_path / 'missing.th'}: "
                                        "no such file"]


def test_bad_option_combinations_exit_with_2(capsys):
  for argv in (["--output", "x"], ["--checkpoint", "a.th", "--output", "x"],
               ["--checkpoint", "a.th", "--release", "r", "--output", "x"],
               ["--checkpoint", "a.th", "--config", "c.py", "--from", "b", "--output", "x"]):
    with pytest.raises(SystemExit) as exit_:
      _run(argv)
    assert exit_.value.code == 2, argv
  assert "give one of --release NAME or --checkpoint FILE" in capsys.readouterr().err
