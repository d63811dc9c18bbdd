"""Evaluation images as they stream: uint8 pixels until the device (the model normalises them),
rows loaded per process by `common.run_batched`, decoding by grain worker processes. (Two
processes each decoding their own rows: tests/test_multiprocess.py.)"""

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from x2vlm_jax import sharding
from x2vlm_jax.data import eval_data, image_ops
from x2vlm_jax.evaluate import common, retrieval
from x2vlm_jax.models import x2vlm

R = 32  # the tiny model's image_res


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
  """Six images of different sizes (5 distinct files, one read by two rows) and a broken one."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  paths = []
  for i in range(5):
    path = root / f"{i}.png"
    Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 40 - 2 * i, 3), dtype=np.uint8)).save(path)
    paths.append(str(path))
  (root / "broken.png").write_bytes(b"not a png")
  return paths + [paths[1], str(root / "broken.png")]


def test_pixels_are_normalised_on_the_device_as_on_the_host():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
  on_device = np.asarray(jax.jit(x2vlm.normalize_pixels)(pixels))
  host = image_ops.normalize(pixels[0])
  assert on_device.dtype == np.float32
  np.testing.assert_allclose(on_device[0], host, rtol=0, atol=3e-7)  # 1 ulp: x * (1 / std)
  assert np.abs(host).max() > 2.0  # the test sees the whole range


def test_uint8_images_embed_as_the_float32_images(image_files):
  """The evaluation path (uint8 `EvalImages` rows split over an 8-device mesh, normalised by
  `X2VLM.encode_image`) gives the image embeddings of the float32 images normalised on the host
  (`load_eval_images`, as before), within 1e-5."""
  readable = image_files[:6]
  model = x2vlm.build_model(tiny.get_config().model)
  params = jax.device_get(nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model)))["params"])
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  fns = retrieval.make_retrieval_fns(model, mesh)
  images = eval_data.EvalImages(readable, [f"r{i}" for i in range(6)], R)
  floats, sizes = eval_data.load_eval_images(readable, R)
  embeds_u8, feat_u8 = retrieval.encode_images(params, images, batch_size=8, fns=fns, mesh=mesh)
  embeds_f32, feat_f32 = retrieval.encode_images(params, floats, batch_size=8, fns=fns, mesh=mesh)
  assert embeds_u8.shape == (8, 1 + (R // 16) ** 2, 32) and feat_u8.shape == (6, 8)
  assert images.num_decoded == 5  # rows 1 and 5 read one file, decoded once
  np.testing.assert_array_equal(images.sizes, sizes)
  np.testing.assert_allclose(np.asarray(embeds_u8), np.asarray(embeds_f32), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(feat_u8), np.asarray(feat_f32), rtol=0, atol=1e-5)
  assert float(np.abs(np.asarray(feat_u8)[0] - np.asarray(feat_u8)[1]).max()) > 1e-2

  # Video frames travel the same way (`load_eval_clips` -> uint8, `X2VLM.encode_video`).
  frames_u8 = np.stack([np.asarray(images[0:2]), np.asarray(images[2:4])])  # [2, F=2, R, R, 3]
  frames_f32 = np.stack([floats[0:2], floats[2:4]])
  encode = jax.jit(lambda p, f: model.apply({"params": p}, f, method=x2vlm.X2VLM.encode_video))
  np.testing.assert_allclose(np.asarray(encode(params, frames_u8)),
                             np.asarray(encode(params, frames_f32)), rtol=0, atol=1e-5)


def test_run_batched_loads_each_batch_rows_once_in_order(image_files):
  """One process holds every row: each batch asks the loader for its rows (the last batch
  padded with the last row), and the outputs are those of the whole arrays."""
  asked = []

  class Rows:
    def __len__(self):
      return 11

    def load_batches(self, batches):
      for rows in batches:
        asked.append(rows.tolist())
        yield np.asarray(rows, np.int32) * 10

  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  np.testing.assert_array_equal(common.local_positions(8, mesh), np.arange(8))
  texts = np.arange(11, dtype=np.int32) + 100
  out = common.run_batched(lambda a, t: (a, t), (Rows(), texts), 8, mesh)
  assert asked == [list(range(8)), [8, 9, 10, 10, 10, 10, 10, 10]]
  np.testing.assert_array_equal(np.asarray(out[0]), np.arange(11) * 10)
  np.testing.assert_array_equal(np.asarray(out[1]), texts)


def test_worker_processes_decode_as_threads_do(image_files, caplog):
  """`decode_workers` > 0: a grain pipeline of worker processes decodes the same pixels, sizes
  and unreadable rows as the threads of this process, and the broken file is still named."""
  where = [f"test.jsonl:{i + 1}" for i in range(len(image_files))]
  batches = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6, 6, 0])]
  threads = eval_data.EvalImages(image_files, where, R)
  workers = eval_data.EvalImages(image_files, where, R, decode_workers=2)
  want = list(threads.load_batches(batches))
  with caplog.at_level("WARNING"):
    got = list(workers.load_batches(batches))
  assert [b.dtype for b in got] == [np.uint8] * 3 and [len(b) for b in got] == [3, 3, 3]
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert workers.bad == threads.bad == {6}
  np.testing.assert_array_equal(workers.sizes, threads.sizes)
  assert workers.num_decoded == threads.num_decoded == 3 + 3 + 2
  assert (got[2][0] == image_ops.MEAN_PIXEL).all()  # the broken image's rows: the mean pixel
  assert any("test.jsonl:7" in r.getMessage() and "broken.png" in r.getMessage()
             for r in caplog.records)
