"""Image decoding / transforms and box arithmetic (patch masks checked against the parity fixture)."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from x2vlm_jax import boxes as box_ops
from x2vlm_jax.data import image_ops

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "pretrain_tiny", "inputs.npz")


def test_patch_mask_reproduces_reference_fixture():
  data = np.load(FIXTURE)
  boxes, expected = data["region_boxes_xywh_pixels"], data["region_image_atts"]
  assert boxes.shape == (5, 4) and expected.shape == (5, 17)
  for box, atts in zip(boxes, expected):
    mask = box_ops.box_patch_mask(box, image_res=64, patch_size=16)
    assert mask.dtype == np.int32
    np.testing.assert_array_equal(mask, atts)


def test_patch_mask_edges_by_hand():
  # G = 4. A sub-pixel box in the top-left corner touches patch 0 only.
  np.testing.assert_array_equal(box_ops.box_patch_mask([0, 0, 1, 1], 64, 16),
                                [1, 1] + [0] * 15)
  # A box on the right edge: x_min = min(floor(63.5/16), 3) = 3, x_max = 4; y in row 1.
  m = box_ops.box_patch_mask([63.5, 20, 0.5, 4], 64, 16)
  assert np.flatnonzero(m).tolist() == [0, 1 + 4 * 1 + 3]
  # A box ending exactly on a patch border does not spill over: x in [16, 32) -> column 1 only.
  m = box_ops.box_patch_mask([16, 0, 16, 16], 64, 16)
  assert np.flatnonzero(m).tolist() == [0, 2]
  np.testing.assert_array_equal(box_ops.full_patch_mask(64, 16), np.ones(17, np.int32))


def test_crop_flip_resize_target_by_hand():
  # Box [10, 4, 8, 6] in a crop (x0, y0, x1, y1) = (2, 1, 34, 17) of size 32 x 16.
  b = box_ops.crop_box([10, 4, 8, 6], 2, 1, 34, 17)
  assert b == (8, 3, 8, 6)
  b = box_ops.flip_box(b, 32)  # x -> 32 - 8 - 8 = 16
  assert b == (16, 3, 8, 6)
  b = box_ops.scale_box(b, 64 / 32, 64 / 16)  # resize to 64 x 64
  assert b == (32, 12, 16, 24)
  np.testing.assert_allclose(box_ops.box_target(b, 64), [0.625, 0.375, 0.25, 0.375])
  # columns [2, 3), rows [0, 3) -> patches 1 + 4 i + 2
  assert np.flatnonzero(box_ops.box_patch_mask(b, 64, 16)).tolist() == [0, 3, 7, 11]


def test_visible_fraction_and_validity():
  assert box_ops.visible_fraction([-5, 0, 10, 10], 0, 0, 100, 100) == pytest.approx(0.5)
  assert box_ops.visible_fraction([200, 0, 10, 10], 0, 0, 100, 100) == 0.0
  assert box_ops.clip_box([-5, 90, 10, 20], 100, 100) == (0.0, 90.0, 5.0, 10.0)
  assert box_ops.is_valid_box([1, 2, 3, 4])
  for bad in ([1, 2, 0, 4], [1, 2, -3, 4], [1, 2, 3, float("nan")], [1, 2, 3], ["a", 1, 2, 3],
              [1, 2, float("inf"), 3]):
    assert not box_ops.is_valid_box(bad)


def test_region_crop_always_contains_the_box():
  rng = np.random.default_rng(0)
  for _ in range(300):
    w, h = int(rng.integers(20, 200)), int(rng.integers(20, 200))
    bw, bh = rng.uniform(1, w), rng.uniform(1, h)
    box = (rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh)
    x0, y0, x1, y1 = image_ops.region_crop_params(box, w, h, rng)
    assert 0 <= x0 <= box[0] and 0 <= y0 <= box[1]
    assert box[0] + box[2] <= x1 + 1e-9 <= w + 1e-9 and box[1] + box[3] <= y1 + 1e-9 <= h + 1e-9
    assert box_ops.visible_fraction(box, x0, y0, x1, y1) == pytest.approx(1.0)


def test_random_resized_crop_params_ranges():
  rng = np.random.default_rng(0)
  for _ in range(300):
    i, j, h, w = image_ops.random_resized_crop_params(120, 80, rng, scale=(0.2, 1.0))
    assert 0 <= i and i + h <= 80 and 0 <= j and j + w <= 120
    assert 0.2 * 9600 * 0.9 <= h * w <= 9600
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # Extreme aspect ratio: every try fails -> central crop with the ratio clamped to 4/3.
  assert image_ops.random_resized_crop_params(1000, 10, rng, scale=(0.9, 1.0)) == (0, 493, 10, 13)


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def test_decode_converts_modes_to_rgb():
  rgb = Image.new("RGB", (7, 5), (10, 200, 30))
  cases = {
      "L": Image.new("L", (7, 5), 77),
      "LA": Image.new("LA", (7, 5), (77, 255)),
      "RGBA": Image.new("RGBA", (7, 5), (10, 200, 30, 255)),
      "P": rgb.convert("P"),
      "1": Image.new("1", (7, 5), 1),
  }
  for mode, img in cases.items():
    out = image_ops.decode_image(_encode(img, "PNG"))
    assert out.mode == "RGB" and out.size == (7, 5), mode
  assert image_ops.decode_image(_encode(cases["L"], "PNG")).getpixel((0, 0)) == (77, 77, 77)
  cmyk = image_ops.decode_image(_encode(Image.new("CMYK", (7, 5), (0, 0, 0, 0)), "JPEG"))
  assert cmyk.mode == "RGB" and min(cmyk.getpixel((3, 3))) > 240  # no ink = white
  # 16-bit grayscale: full scale maps to 255, not clipped garbage.
  arr16 = np.full((5, 7), 65535, np.uint16)
  arr16[0, 0] = 0
  out = image_ops.decode_image(_encode(Image.fromarray(arr16), "PNG"))
  assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)
  # Fully transparent pixels are composited on white.
  clear = image_ops.decode_image(_encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG"))
  assert clear.getpixel((0, 0)) == (255, 255, 255)


def test_decode_applies_exif_orientation():
  img = Image.new("RGB", (40, 20), (255, 0, 0))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  data = _encode(img, "JPEG", exif=exif.tobytes())
  assert image_ops.decode_image(data).size == (20, 40)
  assert image_ops.decode_image(data, exif_transpose=False).size == (40, 20)


def test_decode_errors(tmp_path):
  png = _encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG")
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
  (tmp_path / "text.png").write_bytes(b"this is not an image")
  for name, msg in (("missing.png", "not found"), ("empty.png", "0 bytes"),
                    ("trunc.png", "cannot decode"), ("text.png", "cannot decode")):
    with pytest.raises(image_ops.ImageDecodeError, match=msg):
      image_ops.decode_image(str(tmp_path / name))
  with pytest.raises(image_ops.ImageDecodeError, match="above the limit"):
    image_ops.decode_image(png, max_pixels=1000)
  with pytest.raises(image_ops.ImageDecodeError, match="empty"):
    image_ops.decode_image(b"")


def test_resize_flip_normalize():
  arr = np.zeros((10, 20, 3), np.uint8)
  arr[:, :10] = 255  # left half white
  img = Image.fromarray(arr)
  small = image_ops.resize_square(img, 8)
  assert small.size == (8, 8)
  flipped = np.asarray(image_ops.hflip(small))
  np.testing.assert_array_equal(flipped, np.asarray(small)[:, ::-1])
  norm = image_ops.normalize(small)
  assert norm.shape == (8, 8, 3) and norm.dtype == np.float32
  np.testing.assert_allclose(norm[0, 0], (1.0 - image_ops.CLIP_MEAN) / image_ops.CLIP_STD, rtol=1e-5)
  np.testing.assert_allclose(norm[0, -1], -image_ops.CLIP_MEAN / image_ops.CLIP_STD, rtol=1e-5)
  # crop box then resize: the right (black) half only.
  right = np.asarray(image_ops.resize_square(img, 4, box=(10, 0, 20, 10)))
  assert right.max() == 0


def test_normalize_table_equals_the_float_arithmetic():
  arr = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
  arr[0, 0] = (0, 128, 255)
  want = (arr.astype(np.float32) * np.float32(1.0 / 255.0) - image_ops.CLIP_MEAN) / image_ops.CLIP_STD
  for image in (arr, Image.fromarray(arr)):
    got = image_ops.normalize(image)
    assert got.dtype == np.float32 and got.shape == (7, 5, 3)
    np.testing.assert_array_equal(got, want)  # bit for bit
  np.testing.assert_array_equal(image_ops.normalize(arr.astype(np.float32)), want)
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    image_ops.normalize(arr[..., 0])


def test_rand_augment_ops():
  gray = Image.new("RGB", (16, 16), (100, 100, 100))
  rng = np.random.default_rng(0)
  for name in image_ops.ALL_OPS:
    out = image_ops._apply_op(gray, name, 7, 1.0)
    assert out.size == (16, 16) and out.mode == "RGB", name
  assert image_ops._apply_op(gray, "Brightness", 7, 1.0).getpixel((8, 8)) == (136, 136, 136)
  assert image_ops.rand_augment(gray, rng, 2, 7, ("Identity",)).tobytes() == gray.tobytes()
  a = image_ops.rand_augment(gray, np.random.default_rng(5), 2, 7, image_ops.ALL_OPS)
  b = image_ops.rand_augment(gray, np.random.default_rng(5), 2, 7, image_ops.ALL_OPS)
  assert a.tobytes() == b.tobytes()
