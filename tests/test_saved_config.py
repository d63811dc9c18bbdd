"""Self-describing checkpoints (saved_config.py): config.json + tokenizer beside the params, and
every way of naming a saved config (`DIR`, `DIR/config.json[:arg]`)."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from x2vlm_jax import checkpoint, errors, saved_config, tasks
from x2vlm_jax.configs_loader import load_config
from x2vlm_jax.inference import Predictor
from x2vlm_jax.models import x2vlm

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square"]


@pytest.fixture()
def vocab(tmp_path):
  path = tmp_path / "elsewhere" / "vocab.txt"
  path.parent.mkdir()
  path.write_text("\n".join(WORDS) + "\n")
  return path


def test_saved_config_round_trip_with_its_tokenizer(tmp_path, vocab):
  config = load_config(f"configs/tiny.py:data.vocab_path={vocab},model.image_res=48")
  run = tmp_path / "run"
  run.mkdir()
  saved_config.save(run, config)
  index = json.loads((run / "assets" / "index.json").read_text())
  assert list(index) == ["data.vocab_path"]
  assert index["data.vocab_path"]["source"] == str(vocab)
  assert index["data.vocab_path"]["sha256"] == saved_config.sha256(vocab) == saved_config.sha256(
      run / "assets" / "vocab.txt")

  for spec in (str(run), f"{run}/config.json"):
    loaded = load_config(spec)
    want = config.to_dict()
    want["data"]["vocab_path"] = str(run / "assets" / "vocab.txt")  # the copy, absolute
    assert json.loads(json.dumps(loaded.to_dict())) == json.loads(json.dumps(want))
  assert load_config(f"{run}/config.json:model.image_res=64").model.image_res == 64
  with pytest.raises(KeyError, match="model.image_rez"):
    load_config(f"{run}:model.image_rez=64")


def test_answer_lists_travel_with_the_checkpoint(tmp_path, vocab):
  answers = tmp_path / "elsewhere" / "answers.json"
  answers.write_text(json.dumps(["red", "blue", "two"]))
  config = load_config(f"configs/tiny.py:data.vocab_path={vocab},"
                       f"data.vqa_generative.answer_list={answers},"
                       "data.vqa.answer_list=/no/such/list.json")
  (tmp_path / "run").mkdir()
  saved_config.save(tmp_path / "run", config)
  index = json.loads((tmp_path / "run" / "assets" / "index.json").read_text())
  # A field naming no file (a section this run does not use) is left out, not an error.
  assert sorted(index) == ["data.vocab_path", "data.vqa_generative.answer_list"]
  os.remove(answers)
  loaded = load_config(str(tmp_path / "run"))
  copy = tmp_path / "run" / "assets" / "vqa_generative.answer_list.json"
  assert loaded.data.vqa_generative.answer_list == str(copy)
  assert json.loads(copy.read_text()) == ["red", "blue", "two"]
  assert loaded.data.vqa.answer_list == "/no/such/list.json"
  # Any config given for that checkpoint gets its copies too.
  given = saved_config.use_assets(config, tmp_path / "run")
  assert given.data.vqa_generative.answer_list == str(copy)
  assert config.data.vqa_generative.answer_list == str(answers)  # the given config is unchanged


def test_checkpoint_home_finds_the_workdir_of_a_checkpoint(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints" / "6").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  for source in (run, run / "checkpoints", run / "checkpoints" / "6"):
    assert saved_config.checkpoint_home(source) == str(run)
  assert saved_config.checkpoint_home(tmp_path) is None
  assert saved_config.for_checkpoint(tmp_path) is None


def test_missing_tokenizer_names_the_field_and_the_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=rf"config.data.vocab_path 'nope/vocab.txt'.*"
                     rf"current directory, {tmp_path}"):
    saved_config.tokenizer_file("nope/vocab.txt")


def test_predictor_loads_a_params_dir_alone_from_any_directory(tmp_path, vocab, monkeypatch):
  config = load_config(f"configs/tiny.py:data.vocab_path={vocab}")
  model = tasks.build_model(config)
  params = jax.device_get(nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                                   *x2vlm.init_inputs(model))["params"]))
  checkpoint.save_params(tmp_path / "params", params, config=config)
  os.remove(vocab)  # only the copy inside the params dir is left
  monkeypatch.chdir(tmp_path / "elsewhere")

  predictor = Predictor.load(str(tmp_path / "params"))
  assert predictor.tokenizer.vocab_path == str(tmp_path / "params" / "assets" / "vocab.txt")
  assert predictor.image_res == 32 and predictor.max_tokens == 12
  feats = predictor.embed_texts(["a red circle", "a blue square"])
  assert feats.shape == (2, 8) and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
  # The same params under the model of the same config give the same features.
  again = Predictor(model, params, predictor.tokenizer, 32, 12).embed_texts(["a red circle"])
  np.testing.assert_allclose(again[0], feats[0], atol=1e-6)

  with pytest.raises(errors.InputError, match="no such directory"):
    Predictor.load(str(tmp_path / "nothing"))
  (tmp_path / "bare").mkdir()
  with pytest.raises(errors.InputError, match="has no config.json"):
    Predictor.load(str(tmp_path / "bare"))


def test_a_config_without_tokenizer_takes_its_checkpoints(tmp_path, vocab):
  (tmp_path / "release").mkdir()
  saved_config.save(tmp_path / "release", load_config(f"configs/tiny.py:data.vocab_path={vocab}"))
  bare = load_config("configs/tiny.py")
  assert bare.data.vocab_path == ""
  filled = saved_config.with_checkpoint_tokenizer(bare, str(tmp_path / "release"))
  assert filled.data.vocab_path == str(tmp_path / "release" / "assets" / "vocab.txt")
  assert bare.data.vocab_path == ""  # a copy
  own = load_config("configs/tiny.py:data.vocab_path=mine/vocab.txt")
  assert saved_config.with_checkpoint_tokenizer(own, str(tmp_path / "release")) is own
  assert saved_config.with_checkpoint_tokenizer(bare, "") is bare
  assert saved_config.with_checkpoint_tokenizer(bare, str(tmp_path)) is bare  # no config.json
