"""The inference API (x2vlm_jax/inference.py) and tools/ground.py, tools/retrieve.py on a tiny
random model, checked against direct model computations and the evaluation's own preprocessing."""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import xla_env

from configs import demo as demo_config
from x2vlm_jax import checkpoint, inference
from x2vlm_jax.data import demo, eval_data, image_ops
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.tasks import grounding
from x2vlm_jax.models import x2vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["the red circle", "A blue square, left of a green triangle!", "two shapes",
         "a small yellow square above a large black circle", "white"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Demo data (vocab + 3 val images), the quick demo model with random params (also saved as an
  Orbax params dir) and a Predictor over them."""
  tmp = tmp_path_factory.mktemp("inference")
  data = str(tmp / "data")
  demo.make_demo_data(data, num_train=1, num_val=3, image_size=96, seed=0)
  arg = f"quick,data_dir={data}"
  config = demo_config.get_config(arg)
  model = x2vlm.build_model(config.model)
  params = jax.device_get(nn.meta.unbox(  # jitted: far quicker than op by op on a CPU
      jax.jit(model.init)(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"]))
  ckpt = str(tmp / "ckpt")
  checkpoint.save_params(ckpt, params, config=config)  # config.json + tokenizer beside them
  tokenizer = text_lib.load_tokenizer(config.data.vocab_path)
  predictor = inference.Predictor(model, params, tokenizer, config.model.image_res,
                                  config.data.max_tokens, max_words=config.data.max_words,
                                  batch_size=4)
  images = [os.path.join(data, "images", f"val_{i:06d}.png") for i in range(3)]
  return dict(tmp=tmp, config=config, config_spec=f"configs/demo.py:{arg}", model=model,
              params=params, ckpt=ckpt, predictor=predictor, images=images, tokenizer=tokenizer)


def _eval_texts(env, texts):
  """Texts encoded by the evaluation's own code."""
  d = env["config"].data
  return eval_data.encode_texts(texts, texts, env["tokenizer"], d.max_tokens, d.max_words)


def test_texts_are_encoded_as_evaluation_does(env):
  ids, atts = env["predictor"].prepare_texts(TEXTS)
  want_ids, want_atts = _eval_texts(env, TEXTS)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(atts, want_atts)
  with pytest.raises(ValueError, match="text 1"):
    env["predictor"].prepare_texts(["fine", " ?! "])


def test_embeddings_are_unit_norm_and_itc_is_their_dot_product(env):
  p = env["predictor"]
  img, txt = p.embed_images(env["images"]), p.embed_texts(TEXTS)
  assert img.shape == (3, env["config"].model.embed_dim) and txt.shape == (5, img.shape[1])
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
  scores = p.score(env["images"], TEXTS)
  assert scores["itc"].shape == scores["itm"].shape == (3, 5)
  np.testing.assert_allclose(scores["itc"], img @ txt.T, atol=1e-5)
  assert np.ptp(scores["itc"]) > 1e-3  # not a constant


def test_itm_is_the_softmax_of_a_direct_model_apply(env):
  model, params = env["model"], env["params"]
  pixels, _ = eval_data.load_eval_images(env["images"], env["config"].model.image_res)
  np.testing.assert_array_equal(env["predictor"].prepare_images(env["images"])[0], pixels)
  ids, atts = _eval_texts(env, TEXTS)
  img_idx, txt_idx = (a.ravel() for a in np.indices((3, 5)))

  def itm_logits(m, x, i, a):
    v = m.encode_image(x)
    return m.itm_logits(m.fuse(v, jnp.ones(v.shape[:2], jnp.int32), m.encode_text(i, a), a))

  logits = jax.jit(lambda *a: model.apply({"params": params}, *a, method=itm_logits))(
      pixels[img_idx], ids[txt_idx], atts[txt_idx])
  want = np.asarray(jax.nn.softmax(logits, axis=-1)[:, 1]).reshape(3, 5)
  got = env["predictor"].score(env["images"], TEXTS)["itm"]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert ((got > 0) & (got < 1)).all()


def test_ground_maps_the_normalised_box_to_original_pixels(env):
  rng = np.random.default_rng(0)
  array = rng.integers(0, 256, size=(90, 150, 3), dtype=np.uint8)  # W = 150, H = 90
  p = env["predictor"]
  box = p.ground(array, "the red circle")

  res = env["config"].model.image_res
  pixels = image_ops.normalize(image_ops.resize_square(Image.fromarray(array), res))[None]
  ids, atts = _eval_texts(env, ["the red circle"])
  cx, cy, w, h = np.asarray(grounding.make_grounding_fn(env["model"])(
      env["params"], pixels, ids, atts))[0]
  want = [(cx - w / 2) * 150, (cy - h / 2) * 90, w * 150, h * 90]
  assert len(box) == 4 and all(isinstance(v, float) for v in box)
  np.testing.assert_allclose(box, want, rtol=1e-5, atol=1e-3)

  # A batch of 5 (two jitted calls, the second padded) gives each record's own box.
  images = [array, env["images"][0], array[:, ::-1], env["images"][1], env["images"][2]]
  batch = p.ground_batch(images, TEXTS)
  assert batch.shape == (5, 4)
  np.testing.assert_allclose(batch[0], p.ground(array, TEXTS[0]), atol=1e-4)
  np.testing.assert_allclose(batch[4], p.ground(env["images"][2], TEXTS[4]), atol=1e-4)
  with pytest.raises(ValueError, match="2 images but 1 texts"):
    p.ground_batch(images[:2], TEXTS[:1])


def test_image_inputs_path_pil_array_grayscale_exif_and_bad_files(env, tmp_path):
  p = env["predictor"]
  path = env["images"][0]
  array = np.asarray(Image.open(path).convert("RGB"))
  feats = p.embed_images([path, Image.open(path), array])
  np.testing.assert_allclose(feats[1], feats[0], atol=1e-6)
  np.testing.assert_allclose(feats[2], feats[0], atol=1e-6)
  np.testing.assert_allclose(p.embed_images(array), feats[:1], atol=1e-6)  # one image, no list

  gray = np.asarray(Image.open(path).convert("L"))
  Image.fromarray(gray, "L").save(tmp_path / "gray.png")
  np.testing.assert_allclose(p.embed_images(str(tmp_path / "gray.png")),
                             p.embed_images(np.repeat(gray[..., None], 3, axis=2)), atol=1e-6)

  # EXIF orientation 6 (rotate 90 degrees): read in the displayed frame, whatever the input form.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(array[:, :60]).save(tmp_path / "rotated.jpg", exif=exif)  # stored 60 x 96
  assert inference.load_image(str(tmp_path / "rotated.jpg")).size == (96, 60)
  assert inference.load_image(Image.open(tmp_path / "rotated.jpg")).size == (96, 60)
  assert inference.load_image(inference.load_image(str(tmp_path / "rotated.jpg"))).size == (96, 60)

  (tmp_path / "corrupt.jpg").write_bytes(b"this is not a jpeg")
  with pytest.raises(ValueError, match="corrupt.jpg"):
    p.embed_images([path, str(tmp_path / "corrupt.jpg")])
  with pytest.raises(ValueError, match="missing.png"):
    p.ground(str(tmp_path / "missing.png"), "the red circle")
  with pytest.raises(ValueError, match="uint8"):
    p.embed_images(array.astype(np.float32))


def _tool(name, *args):
  proc_env = xla_env.subprocess_env(1)
  proc = subprocess.run([sys.executable, os.path.join("tools", name), *args], cwd=ROOT,
                        env=proc_env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_ground_tool_draws_boxes_on_the_original_image(env):
  image = str(env["tmp"] / "wide.png")
  Image.open(env["images"][0]).resize((150, 90)).save(image)
  out = str(env["tmp"] / "boxed.png")
  texts = ["the red circle", "the blue square"]
  proc = _tool("ground.py", "--config", env["config_spec"], "--checkpoint", env["ckpt"],
               "--image", image, "--text", texts[0], "--text", texts[1], "--out", out)
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [(r["image"], r["text"]) for r in rows] == [(image, t) for t in texts]
  want = env["predictor"].ground_batch([image, image], texts)  # same params, loaded from disk
  np.testing.assert_allclose([r["box_xywh"] for r in rows], want, atol=0.02)

  drawn = Image.open(out)
  assert drawn.size == (150, 90)
  colours = {tuple(c) for c in np.asarray(drawn.convert("RGB")).reshape(-1, 3)}
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  try:
    import ground as ground_tool  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  assert set(ground_tool.COLOURS[:2]) <= colours  # one colour per text


def test_retrieve_tool_ranks_reranks_and_skips_bad_files(env):
  folder = env["tmp"] / "folder"
  folder.mkdir()
  for path in env["images"]:
    shutil.copy(path, folder / os.path.basename(path))
  (folder / "broken.png").write_bytes(b"\x89PNG not really")
  (folder / "notes.txt").write_text("not an image")
  query = "a red circle left of a blue square"
  proc = _tool("retrieve.py", "--checkpoint", env["ckpt"],  # its saved config
               "--images", str(folder), "--query", query, "--top", "2", "--rerank", "3")
  assert "broken.png" in proc.stderr and "notes.txt" not in proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [(r["query"], r["rank"]) for r in rows] == [(query, 1), (query, 2)]

  paths = [str(folder / os.path.basename(p)) for p in env["images"]]  # sorted, readable
  scores = env["predictor"].score(paths, [query])
  itc, itm = scores["itc"][:, 0], scores["itm"][:, 0]
  best = sorted(range(3), key=lambda i: -itm[i])[:2]  # all 3 re-ranked by ITM
  assert [r["path"] for r in rows] == [paths[i] for i in best]
  np.testing.assert_allclose([r["itc"] for r in rows], itc[best], atol=1e-4)
  np.testing.assert_allclose([r["itm"] for r in rows], itm[best], atol=1e-4)
