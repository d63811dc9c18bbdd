"""Model-driven evaluation: retrieval (ITC + ITM re-ranking) and grounding on a tiny random model,
checked against brute force (every pair / record through the model on its own)."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from x2vlm_jax import sharding
from x2vlm_jax.evaluate import common, retrieval
from x2vlm_jax.evaluate import retrieval_metrics as metrics_lib
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import grounding
from x2vlm_jax.tasks import retrieval as retrieval_task

N_IMG, N_TXT, L, K = 6, 12, 12, 3
BATCH = 4  # 6 images / 12 texts / 18 and 36 pairs: the last batch of images and of pairs padded


@pytest.fixture(scope="module")
def tiny_model():
  cfg = tiny.get_config()
  model = x2vlm.build_model(cfg.model)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model)))["params"]
  return model, jax.device_get(params)


def _texts(rng, n, vocab=64):
  ids = np.zeros((n, L), np.int32)
  atts = np.zeros((n, L), np.int32)
  for t in range(n):
    length = int(rng.integers(3, L + 1))
    ids[t, :length] = np.concatenate([[2], rng.integers(5, vocab, length - 2), [3]])
    atts[t, :length] = 1
  return ids, atts


@pytest.fixture(scope="module")
def retrieval_data():
  rng = np.random.default_rng(0)
  ids, atts = _texts(rng, N_TXT)
  txt2img = np.arange(N_TXT, dtype=np.int32) // 2  # two captions per image
  return dict(images=rng.normal(size=(N_IMG, 32, 32, 3)).astype(np.float32), text_ids=ids,
              text_atts=atts, txt2img=txt2img,
              img2txt=[[2 * i, 2 * i + 1] for i in range(N_IMG)])


def _brute_force(model, params, data, k):
  """Every image / text / pair through the model on its own (batch 1)."""
  v = {"params": params}
  enc_img = jax.jit(lambda x: model.apply(v, x, method=x2vlm.X2VLM.encode_image))
  enc_txt = jax.jit(lambda i, a: model.apply(v, i, a, method=x2vlm.X2VLM.encode_text))
  img_feat = jax.jit(lambda e: model.apply(v, e, method=x2vlm.X2VLM.image_features))
  txt_feat = jax.jit(lambda e: model.apply(v, e, method=x2vlm.X2VLM.text_features))

  @jax.jit
  def itm(ie, te, ta):
    cross = model.apply(v, ie, jnp.ones(ie.shape[:2], jnp.int32), te, ta,
                        method=x2vlm.X2VLM.fuse)
    return model.apply(v, cross, method=x2vlm.X2VLM.itm_logits)[0, 1]

  ie = [enc_img(data["images"][i:i + 1]) for i in range(len(data["images"]))]
  te = [enc_txt(data["text_ids"][t:t + 1], data["text_atts"][t:t + 1])
        for t in range(len(data["text_ids"]))]
  sims = np.array([[float(img_feat(a)[0] @ txt_feat(b)[0]) for b in te] for a in ie])
  logits = np.array([[float(itm(a, b, data["text_atts"][t:t + 1])) for t, b in enumerate(te)]
                     for a in ie])
  s_i2t = np.full(sims.shape, -100.0, np.float32)
  for i in range(sims.shape[0]):
    top = np.argsort(-sims[i], kind="stable")[:k]
    s_i2t[i, top] = logits[i, top]
  s_t2i = np.full(sims.T.shape, -100.0, np.float32)
  for t in range(sims.shape[1]):
    top = np.argsort(-sims[:, t], kind="stable")[:k]
    s_t2i[t, top] = logits[top, t]
  return sims, s_i2t, s_t2i


@pytest.fixture(scope="module")
def retrieval_run(tiny_model, retrieval_data):
  model, params = tiny_model
  before = dict(common.TRACE_COUNTS)
  lines = []
  result = retrieval.evaluate_retrieval(
      model, params, retrieval_data, k_test=K, batch_size=BATCH, include_itc=True,
      log_fn=lines.append)
  metrics, (s_i2t, s_t2i) = result.metrics, result.dense()
  traces = {k: v - before.get(k, 0) for k, v in common.TRACE_COUNTS.items()
            if v != before.get(k, 0)}  # functions traced by earlier tests are not counted
  return metrics, s_i2t, s_t2i, traces, lines


@pytest.fixture(scope="module")
def brute(tiny_model, retrieval_data):
  return _brute_force(*tiny_model, retrieval_data, K)


def test_scores_equal_brute_force(retrieval_run, brute):
  _, s_i2t, s_t2i, _, _ = retrieval_run
  sims, want_i2t, want_t2i = brute
  # The top-k sets are well separated from the rest (so batching noise cannot flip them).
  for row in (sims, sims.T):
    srt = -np.sort(-row, axis=1)
    assert (srt[:, K - 1] - srt[:, K] > 1e-5).all()
  assert s_i2t.shape == (N_IMG, N_TXT) and s_t2i.shape == (N_TXT, N_IMG)
  assert s_i2t.dtype == np.float32
  np.testing.assert_array_equal(s_i2t == -100, want_i2t == -100)
  np.testing.assert_array_equal(s_t2i == -100, want_t2i == -100)
  assert ((s_i2t != -100).sum(1) == K).all() and ((s_t2i != -100).sum(1) == K).all()
  np.testing.assert_allclose(s_i2t, want_i2t, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(s_t2i, want_t2i, atol=2e-5, rtol=1e-5)


def test_metrics_equal_metrics_of_brute_force_scores(retrieval_run, brute, retrieval_data):
  metrics, _, _, _, lines = retrieval_run
  sims, want_i2t, want_t2i = brute
  want = metrics_lib.retrieval_metrics(want_i2t, want_t2i, retrieval_data["img2txt"],
                                       retrieval_data["txt2img"])
  itc = metrics_lib.retrieval_metrics(sims, sims.T, retrieval_data["img2txt"],
                                      retrieval_data["txt2img"])
  assert {k: v for k, v in metrics.items() if not k.startswith("itc_")} == pytest.approx(want)
  assert {k[4:]: v for k, v in metrics.items() if k.startswith("itc_")} == pytest.approx(itc)
  assert any("ITC" in line and "ITM" in line for line in lines)


def test_rows_grouped_by_image_in_both_directions_score_as_pair_by_pair(tiny_model,
                                                                       retrieval_data, brute):
  """Each image goes to the fusion layers once per group of the texts paired with it in either
  direction (keys and values projected once per group): the scores of pair-by-pair fusion."""
  model, params = tiny_model
  before = common.TRACE_COUNTS["pair_itm"]
  s_i2t, s_t2i = retrieval.evaluate_retrieval(model, params, retrieval_data, k_test=K,
                                              batch_size=2 * K, log_fn=lambda line: None).dense()
  assert common.TRACE_COUNTS["pair_itm"] - before <= 2  # groups of k texts and of k / 8
  _, want_i2t, want_t2i = brute
  np.testing.assert_allclose(s_i2t, want_i2t, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(s_t2i, want_t2i, atol=2e-5, rtol=1e-5)


def test_jitted_functions_compile_once(retrieval_run):
  traces = retrieval_run[3]
  # 2 image batches, 3 text batches, the re-ranking groups of both directions, each with a padded
  # last batch; top-k and ITC ranks once per direction (rows of images, rows of texts).
  # Re-ranking: one shape per group size used (k texts; k / 8 for the rest of an image's texts).
  assert traces.pop("pair_itm") in (1, 2)
  assert traces == {"encode_images": 1, "encode_texts": 1, "top_k": 2, "itc_ranks": 2}


class _CodeModel(nn.Module):
  """A parameter-free stand-in with known answers. Image i carries one-hot code e_i (pixel row
  0); text ids[0] = its true image (read by ITM), ids[1] = a decoy image (read by ITC)."""
  n: int = N_IMG

  def encode_image(self, x):
    return x[:, :1, :self.n, 0]  # [B, 1, n]

  def image_features(self, e):
    return e[:, 0]

  def encode_text(self, ids, atts):
    return jax.nn.one_hot(ids, self.n) * atts[..., None]  # [B, L, n]

  def text_features(self, e):
    return e[:, 1]  # the decoy code: ITC ranks the decoy image first

  def fuse(self, v, va, t, ta):
    return v[:, :1] * t[:, :1]  # [B, 1, n]: nonzero only for the true pair

  def itm_logits(self, cross):
    s = jnp.sum(cross[:, 0], -1)
    return jnp.stack([-s, s], -1)


@pytest.mark.parametrize("k,want_r1", [(N_TXT, 100.0), (1, 0.0)])
def test_known_answers_with_a_code_model(k, want_r1):
  images = np.zeros((N_IMG, 32, 32, 3), np.float32)
  images[np.arange(N_IMG), 0, np.arange(N_IMG), 0] = 1.0
  txt2img = np.arange(N_TXT, dtype=np.int32) // 2
  ids = np.stack([txt2img, (txt2img + 1) % N_IMG], 1).astype(np.int32)
  data = dict(images=images, text_ids=ids, text_atts=np.ones_like(ids), txt2img=txt2img,
              img2txt=[[2 * i, 2 * i + 1] for i in range(N_IMG)])
  result = retrieval.evaluate_retrieval(_CodeModel(), {}, data, k_test=k, batch_size=5,
                                        include_itc=True)
  metrics, (s_i2t, s_t2i) = result.metrics, result.dense()
  assert metrics["itc_txt_r1"] == 0.0 and metrics["itc_img_r1"] == 0.0  # ITC always wrong
  assert metrics["txt_r1"] == want_r1 and metrics["img_r1"] == want_r1
  if k == N_TXT:  # everything re-ranked: scores = ITM logits exactly
    np.testing.assert_array_equal(s_i2t, (txt2img[None, :] == np.arange(N_IMG)[:, None]))
    np.testing.assert_array_equal(s_t2i, s_i2t.T)


def test_mesh_matches_single_device(tiny_model, retrieval_data, retrieval_run):
  model, params = tiny_model
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  s_i2t, s_t2i = retrieval.evaluate_retrieval(model, params, retrieval_data, k_test=K,
                                              batch_size=8, mesh=mesh).dense()
  np.testing.assert_allclose(s_i2t, retrieval_run[1], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(s_t2i, retrieval_run[2], atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="divisible"):
    retrieval.evaluate_retrieval(model, params, retrieval_data, k_test=K, batch_size=6, mesh=mesh)


# ------------------------------------------------------------------------------- grounding


def test_grounding_equals_brute_force_on_non_square_images(tiny_model):
  model, params = tiny_model
  rng = np.random.default_rng(1)
  n = 5
  ids, atts = _texts(rng, n)
  images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
  sizes = np.array([[640, 480], [100, 300], [333, 200], [64, 64], [1000, 10]], np.int32)
  v = {"params": params}

  @jax.jit
  def one(x, i, a):
    ie = model.apply(v, x, method=x2vlm.X2VLM.encode_image)
    te = model.apply(v, i, a, method=x2vlm.X2VLM.encode_text)
    cross = model.apply(v, ie, jnp.ones(ie.shape[:2], jnp.int32), te, a, method=x2vlm.X2VLM.fuse)
    return model.apply(v, cross, method=x2vlm.X2VLM.predict_box)[0]

  want = []
  for r in range(n):
    cx, cy, w, h = np.asarray(one(images[r:r + 1], ids[r:r + 1], atts[r:r + 1]), np.float64)
    W, H = sizes[r]
    want.append([(cx - w / 2) * W, (cy - h / 2) * H, w * W, h * H])
  want = np.array(want)
  # Ground truth: exact for records 0, 2, 3; far away for 1 and 4 -> Acc 60 %, mIoU 60 %.
  gt = want.copy()
  gt[[1, 4], 0] += 10 * gt[[1, 4], 2]
  data = dict(images=images, text_ids=ids, text_atts=atts, bbox_xywh=gt.astype(np.float32),
              image_size=sizes)
  before = common.TRACE_COUNTS["grounding_boxes"]
  metrics, pred = grounding.evaluate_grounding(model, params, data, batch_size=2)
  assert common.TRACE_COUNTS["grounding_boxes"] - before == 1  # 3 batches, last padded
  assert pred.shape == (n, 4)
  np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-3)
  assert metrics["grounding_acc"] == pytest.approx(60.0)
  assert metrics["grounding_miou"] == pytest.approx(60.0, abs=1e-3)

  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  metrics_mesh, pred_mesh = grounding.evaluate_grounding(model, params, data, batch_size=8,
                                                         mesh=mesh, plus_one=True)
  np.testing.assert_allclose(pred_mesh, want, rtol=1e-5, atol=1e-3)
  assert metrics_mesh["grounding_acc"] == pytest.approx(60.0)


# ------------------------------------------------------------------------------- end to end


def test_end_to_end_from_files(tiny_model, tmp_path):
  model, params = tiny_model
  words = ["red", "green", "blue", "circle", "square", "a", "on", "the"]
  (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                + words) + "\n")
  rng = np.random.default_rng(2)
  with open(tmp_path / "test.jsonl", "w") as f:
    for i, (w, h) in enumerate([(40, 30), (32, 64), (50, 50)]):
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
      caps = [f"a {words[i]} circle", f"the {words[i]} square on a circle"][: 1 + i % 2]
      f.write(json.dumps({"image": f"{i}.png", "caption": caps}) + "\n")
  data = retrieval_task.load_retrieval_eval(str(tmp_path / "test.jsonl"), str(tmp_path), 32,
                                            str(tmp_path / "vocab.txt"), L)
  assert data["images"][0:3].shape == (3, 32, 32, 3) and len(data["text_ids"]) == 4
  np.testing.assert_array_equal(data["images"].sizes, [[40, 30], [32, 64], [50, 50]])
  result = retrieval.evaluate_retrieval(model, params, data, k_test=2, batch_size=BATCH)
  metrics, (s_i2t, s_t2i) = result.metrics, result.dense()
  assert s_i2t.shape == (3, 4) and s_t2i.shape == (4, 3)
  assert ((s_i2t != -100).sum(1) == 2).all() and ((s_t2i != -100).sum(1) == 2).all()
  assert set(metrics) >= {"txt_r1", "img_r1", "r_mean"}
  assert all(0.0 <= v <= 100.0 for v in metrics.values())


def test_unreadable_images_are_named_counted_and_scored_as_misses(tiny_model, tmp_path, caplog):
  """An image that cannot be decoded does not stop the evaluation: a warning names its record,
  its rows (and the rows of its captions / expressions) count as misses in every denominator."""
  model, params = tiny_model
  (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                 "a", "red", "circle"]) + "\n")
  rng = np.random.default_rng(3)
  with open(tmp_path / "test.jsonl", "w") as f:
    for i in range(3):
      Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
      f.write(json.dumps({"image": f"{i}.png", "caption": ["a red circle", "a circle"]}) + "\n")
  (tmp_path / "1.png").write_bytes(b"not a png")  # exists (so the evaluator builds) but is broken
  data = retrieval_task.load_retrieval_eval(str(tmp_path / "test.jsonl"), str(tmp_path), 32,
                                            str(tmp_path / "vocab.txt"), L)
  with caplog.at_level("WARNING"):
    metrics = retrieval.evaluate_retrieval(model, params, data, k_test=6, batch_size=BATCH,
                                           include_itc=True).metrics
  assert any("test.jsonl:2" in r.getMessage() and "1.png" in r.getMessage()
             for r in caplog.records)
  assert metrics["bad_images"] == 1.0
  # 6 texts, all within the top 10: every row is a hit but the broken image's row (TR) and its
  # two captions' rows (IR).
  assert metrics["txt_r10"] == pytest.approx(200 / 3) and metrics["img_r10"] == pytest.approx(
      400 / 6)
  assert metrics["itc_txt_r10"] == pytest.approx(200 / 3)

  with open(tmp_path / "ground.jsonl", "w") as f:
    for i in range(3):
      f.write(json.dumps({"image": f"{i}.png", "text": "a red circle", "bbox": [0, 0, 30, 20]})
              + "\n")
  boxes = grounding.load_grounding_eval(str(tmp_path / "ground.jsonl"), str(tmp_path), 32,
                                        str(tmp_path / "vocab.txt"), L)
  metrics, pred = grounding.evaluate_grounding(model, params, boxes, batch_size=2,
                                               threshold=1e-6)
  assert metrics["bad_images"] == 1.0 and len(pred) == 3
  assert metrics["grounding_acc"] == pytest.approx(200 / 3)  # any overlap: all but the broken one


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1)])
def test_sharded_params_on_the_mesh_give_the_single_device_scores(tiny_model, retrieval_data,
                                                                  retrieval_run, shape):
  """Evaluation on the trainer's mesh with the parameters as training shards them (FSDP over 4
  devices in the second case: no gather to one device) scores as one device does."""
  from configs import tiny as tiny_config
  from x2vlm_jax import cli, tasks

  model, params = tiny_model
  config = tiny_config.get_config()
  config.unlock()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  mesh = sharding.make_mesh(config.mesh)
  placed = cli.place_params(config, tasks.build_model(config), params, mesh)
  kernel = placed["vision"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  sharded = kernel.sharding.shard_shape(kernel.shape) != kernel.shape
  assert sharded == (shape[1] > 1)
  s_i2t, s_t2i = retrieval.evaluate_retrieval(model, placed, retrieval_data, k_test=K,
                                              batch_size=8, mesh=mesh).dense()
  np.testing.assert_allclose(s_i2t, retrieval_run[1], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s_t2i, retrieval_run[2], atol=1e-5, rtol=1e-5)
