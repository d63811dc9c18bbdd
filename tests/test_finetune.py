"""Fine-tuning: JSON-list annotations, retrieval image ids, grounding examples, the retrieval and
grounding objectives, and starting from a checkpoint of another resolution / with an MLM head."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, tiny
from x2vlm_jax import checkpoint, convert, losses, tasks, train
from x2vlm_jax.data import demo
from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common as eval_common
from x2vlm_jax.evaluate import retrieval as retrieval_engine
from x2vlm_jax.models import loading, x2vlm
from x2vlm_jax.tasks import grounding


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  return demo.make_demo_data(str(out), num_train=16, num_val=4, image_size=48, seed=0)


def _config(paths, **grounding_fields):
  """A full config (unlocked) reading the demo files, 32 px images in 16 px patches."""
  config = common.base_config()
  config.model.image_res, config.model.patch_size = 32, 16
  cfg = config.data
  cfg.vocab_path = paths["vocab"]
  cfg.max_tokens = cfg.max_words = 12
  cfg.max_masks = 3
  cfg.read_threads = 1
  cfg.image_text.files = [paths["train_image_text"]]
  cfg.image_text.image_root = paths["image_root"]
  cfg.grounding.files = [paths["train_grounding"]]
  cfg.grounding.image_root = paths["image_root"]
  cfg.grounding.batch_size = 4
  for k, v in grounding_fields.items():
    cfg.grounding[k] = v
  return config


# ------------------------------------------------------------------------------ data
def test_json_list_files_are_read_like_jsonl(tmp_path):
  rows = [{"image": "a.png", "caption": "x"}, {"image": "b.png", "caption": "y"}, 7]
  path = tmp_path / "train.json"
  path.write_text(json.dumps(rows, indent=1))
  src = records.make_source([str(path)])
  assert len(src) == 3 and isinstance(src, records.JsonListSource)
  assert records.parse_record(src[1]) == rows[1] and src[1].where == f"{path}:item 1"
  with pytest.raises(records.BadRecordError, match="JSON int"):
    records.parse_record(src[2])
  (tmp_path / "bad.json").write_text('{"not": "a list"}')
  # A .json file that is not an array is read as JSON lines (one object per line).
  assert isinstance(records.make_source([str(tmp_path / "bad.json")]), records.JsonlSource)
  (tmp_path / "broken.json").write_text('[{"image": "a.png"},')
  with pytest.raises(records.BadDataError, match="broken.json"):
    len(records.make_source([str(tmp_path / "broken.json")]))


def test_captions_of_one_image_share_an_image_idx(demo_paths):
  cfg = _config(demo_paths).data
  encoder = text_lib.TextEncoder.from_config(cfg)
  proc = examples_lib.ImageTextProcessor(cfg, cfg.image_text, 32, 16, encoder)
  rng = np.random.default_rng(0)

  def idx(rec):
    return int(proc(records.RawRecord("t:1", rec), rng)["image_idx"])

  image = json.loads(open(demo_paths["train_image_text"]).readline())["image"]
  a = idx({"image": image, "caption": "a red circle", "image_id": 17})
  assert a == idx({"image": image, "caption": "a blue square", "image_id": 17})
  assert a == idx({"image": image, "caption": "x", "image_id": "17"})  # ids compare as text
  assert a != idx({"image": image, "caption": "a red circle", "image_id": 18})
  no_id = idx({"image": image, "caption": "a red circle"})  # falls back to the image path
  assert no_id == idx({"image": image, "caption": "another caption"}) and 0 <= no_id < 2**31


def test_grounding_examples_keep_and_mirror_the_box(demo_paths, tmp_path):
  cfg = _config(demo_paths, random_crop=False, randaug=False, hflip_prob=0.0).data
  encoder = text_lib.TextEncoder.from_config(cfg)
  rec = json.loads(open(demo_paths["train_grounding"]).readline())
  rec["text"] = "the shape on the left"
  x, y, w, h = rec["bbox"]
  expected = np.array([(x + w / 2) / 48, (y + h / 2) / 48, w / 48, h / 48], np.float32)
  rng = np.random.default_rng(0)
  plain = grounding.GroundingProcessor(cfg, cfg.grounding, 32, 16, encoder)(
      records.RawRecord("g:1", rec), rng)
  np.testing.assert_allclose(plain["target_bbox"], expected, atol=1e-6)
  assert plain["image"].shape == (32, 32, 3) and set(plain) >= {"text_ids", "text_atts"}

  cfg.grounding.hflip_prob = 1.0
  flipped = grounding.GroundingProcessor(cfg, cfg.grounding, 32, 16, encoder)(
      records.RawRecord("g:1", rec), rng)
  np.testing.assert_allclose(flipped["target_bbox"], [1 - expected[0], *expected[1:]], atol=1e-6)
  np.testing.assert_allclose(flipped["image"], plain["image"][:, ::-1], atol=1e-5)
  tok = text_lib.load_tokenizer(demo_paths["vocab"])
  words = lambda ex: tok.convert_ids_to_tokens([i for i in ex["text_ids"] if i > 4])
  assert "left" in words(plain) and "right" in words(flipped) and "left" not in words(flipped)

  for bad, reason in (({"image": rec["image"], "text": "x", "bbox": [1, 2]}, "bbox"),
                      ({"image": rec["image"], "bbox": rec["bbox"]}, "text"),
                      ({"image": rec["image"], "text": "x", "bbox": [500, 500, 4, 4]}, "outside")):
    out = grounding.GroundingProcessor(cfg, cfg.grounding, 32, 16, encoder)(
        records.RawRecord("g:9", bad), rng)
    assert examples_lib.is_bad(out) and reason in out.reason and out.where == "g:9"


def test_grounding_iterator_batches(demo_paths):
  batch = next(tasks.get("grounding").make_iterator(_config(demo_paths), seed=0))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["text_ids"].shape == (4, 12)
  assert batch["target_bbox"].shape == (4, 4) and int(batch["num_bad_records"]) == 0
  assert ((batch["target_bbox"] > 0) & (batch["target_bbox"] <= 1)).all()


# ------------------------------------------------------------------------------ objectives
@pytest.fixture(scope="module")
def tiny_model_params():
  config = tiny.get_config()
  model = x2vlm.build_model(config.model)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"])
  return config, model, params


def _task_loss(name, config):
  """The task's objective as a `method=` for `model.apply` (deterministic)."""
  task = tasks.get(name)
  return lambda m, b, r: task.loss(m, b, r, deterministic=True, config=config)


def _retrieval_batch(rng, config, image_idx):
  m, n = config.model, len(image_idx)
  ids = rng.integers(5, m.vocab_size, size=(n, 6)).astype(np.int32)
  ids[:, 0] = 2
  return dict(image=rng.normal(size=(n, m.image_res, m.image_res, 3)).astype(np.float32),
              text_ids=ids, text_atts=np.ones_like(ids), image_idx=np.asarray(image_idx, np.int32))


def test_retrieval_objective_uses_same_image_targets(tiny_model_params):
  config, model, params = tiny_model_params
  batch = _retrieval_batch(np.random.default_rng(0), config, [5, 5, 9, 9, 9, 3])
  out = model.apply({"params": params}, batch, jax.random.PRNGKey(1),
                    method=_task_loss("retrieval", config))
  assert set(out) == {"itc", "itm"}

  def itc(m, b):
    image_feat = m.image_features(m.encode_image(b["image"]))
    text_feat = m.text_features(m.encode_text(b["text_ids"], b["text_atts"]))
    return losses.itc_loss(image_feat, text_feat, m.clamped_temp(), jnp.asarray(b["image_idx"]))

  np.testing.assert_allclose(out["itc"], model.apply({"params": params}, batch, method=itc),
                             rtol=1e-6)
  # Same-image soft targets are not the plain diagonal targets: the loss differs.
  plain = dict(batch, image_idx=np.arange(6, dtype=np.int32))
  assert abs(float(out["itc"]) - float(model.apply({"params": params}, plain, method=itc))) > 1e-3


def test_grounding_objective_is_the_box_loss_of_the_fused_cls(tiny_model_params):
  config, model, params = tiny_model_params
  rng = np.random.default_rng(0)
  batch = _retrieval_batch(rng, config, range(4))
  batch["target_bbox"] = rng.uniform(0.2, 0.6, size=(4, 4)).astype(np.float32)
  out = model.apply({"params": params}, batch, None, method=_task_loss("grounding", config))

  def direct(m, b):
    embeds = m.encode_image(b["image"])
    cross = m.fuse(embeds, jnp.ones(embeds.shape[:2], jnp.int32),
                   m.encode_text(b["text_ids"], b["text_atts"]), b["text_atts"])
    return losses.box_losses(m.predict_box(cross), b["target_bbox"])

  l1, giou = model.apply({"params": params}, batch, method=direct)
  np.testing.assert_allclose([out["bbox_l1"], out["bbox_giou"]], [l1, giou], rtol=1e-6)
  assert float(out["bbox_l1"]) > 0


def test_train_step_runs_retrieval_and_grounding_batches(tiny_model_params):
  config, _, _ = tiny_model_params
  config = tiny.get_config()
  config.unlock()
  config.train.tasks = {"retrieval": 1.0, "grounding": 0.5}
  config.model.mlm_head = False
  trainer = train.Trainer.create(config)
  assert tuple(trainer.tasks) == ("grounding", "retrieval")
  rng = np.random.default_rng(0)
  retrieval = _retrieval_batch(rng, config, [0, 0, 1, 1, 2, 2, 3, 3])
  grounding = dict(_retrieval_batch(rng, config, range(8)),
                   target_bbox=rng.uniform(0.2, 0.6, size=(8, 4)).astype(np.float32))
  del grounding["image_idx"]
  batches = trainer.global_batches({"retrieval": retrieval, "grounding": grounding})
  state = trainer.init_state(0)
  first = None
  for step in range(4):
    state, metrics = trainer.train_step(state, batches, jax.random.PRNGKey(step))
    first = first if first is not None else float(metrics["loss"])
    expected = (float(metrics["retrieval/itc"]) + float(metrics["retrieval/itm"])
                + 0.5 * (float(metrics["grounding/bbox_l1"]) + float(metrics["grounding/bbox_giou"])))
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["loss"]) < first


# ------------------------------------------------------------------------------ init checkpoint
def test_init_from_another_resolution_drops_mlm_head_and_resizes_tables(tmp_path):
  pre = tiny.get_config()
  pre.unlock()
  pre.model.image_res = 64  # a 4x4 grid (7x7 offsets: a cubic spline needs more than 3 points)
  pre_trainer = train.Trainer.create(pre)
  pre_params = jax.device_get(pre_trainer.init_state(0)["params"])
  checkpoint.save_params(tmp_path / "pre", pre_params)

  ft = tiny.get_config()
  ft.unlock()
  ft.model.image_res, ft.model.mlm_head = 96, False
  ft_model = tasks.build_model(ft)
  with pytest.raises(loading.CheckpointMismatchError,
                     match=r"0 missing, 5 unexpected, 0 shape mismatches(.|\n)*text/mlm_"):
    loading.load_params(ft_model, str(tmp_path / "pre"))
  loaded, step = loading.load_params(ft_model, str(tmp_path / "pre"),
                                     ignore_unexpected=("text/mlm_*",))
  assert step == 0  # a params dir
  loaded = convert.flatten(loaded)
  stored = convert.flatten(pre_params)
  table = "vision/blocks_0/attn/relative_position_bias_table"
  assert stored[table].shape[0] == 7 * 7 + 3 and loaded[table].shape[0] == 11 * 11 + 3
  np.testing.assert_allclose(loaded[table][-3:], stored[table][-3:])  # cls rows kept
  for name, value in loaded.items():
    if "relative_position_bias_table" not in name:
      np.testing.assert_array_equal(value, stored[name], err_msg=name)
  assert not any(n.startswith("text/mlm_") for n in loaded)


def test_init_from_a_training_workdir(tmp_path):
  config = tiny.get_config()
  trainer = train.Trainer.create(config)
  state = trainer.init_state(3)
  with checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as ckpt:
    ckpt.save(5, state, force=True)
  params, step = loading.load_params(trainer.model, str(tmp_path / "run"))
  assert step == 5
  for name, value in convert.flatten(jax.device_get(state["params"])).items():
    np.testing.assert_array_equal(convert.flatten(params)[name], value, err_msg=name)


# ------------------------------------------------------------------------------ evaluation outputs
def test_top_rankings_are_best_first_with_stable_ties():
  # Candidates of a re-ranked evaluation: rows 0 and 1 re-scored at columns (1, 2) and (0, 3),
  # every other column at -100.
  result = retrieval_engine.RetrievalResult(
      {}, np.array([[1, 2], [0, 3]]), np.array([[0.9, 0.9], [1.0, 0.5]]),
      np.array([[1], [0], [0], [1]]), np.array([[0.9], [0.9], [0.5], [0.5]]))
  out = result.rankings(3)
  assert out["image_to_text"] == [[1, 2, 0], [0, 3, 1]]
  assert out["text_to_image"] == [[1, 0], [0, 1], [0, 1], [1, 0]]
  dense_i2t, _ = result.dense()
  want = np.argsort(-dense_i2t, axis=1, kind="stable")[:, :3].tolist()
  assert out["image_to_text"] == want
  assert eval_common.split_name("/d/refcoco+_testA.json") == "refcoco+_testA"
