"""Image operations (PIL / numpy). Images stay PIL RGB (HWC uint8) until `normalize`.

  decode_image(path | bytes)          -> PIL RGB image (EXIF transpose, mode conversion, size guard)
  random_resized_crop_params(...)     -> torchvision RandomResizedCrop window (i, j, h, w)
  region_crop_params(...)             -> crop (x0, y0, x1, y1) containing a box (§3.3 step 2)
  resize_square(img, R, box=None)     -> R x R bicubic (aspect not kept), optional crop box
  hflip(img)                          -> mirrored image
  rand_augment(img, rng, ...)         -> RandAugment(N, M) (colour-only or with geometric ops)
  normalize(img)                      -> float32 [R, R, 3] with CLIP mean / std (on the host; the
                                         model does the same to uint8 pixels, `X2VLM.encode_image`)

All randomness comes from a `numpy.random.Generator`.
"""
from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# The one definition of the pixel normalisation (x / 255 - CLIP_MEAN) / CLIP_STD, float32: used by
# `normalize` (host) and by `X2VLM.encode_image` on uint8 pixels (device).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# The uint8 pixel nearest the mean [3] (normalises to within 0.01 of 0): fills unreadable images.
MEAN_PIXEL = np.round(CLIP_MEAN * 255.0).astype(np.uint8)


class ImageDecodeError(ValueError):
  """The image could not be read, decoded or converted."""


def to_rgb(img: Image.Image) -> Image.Image:
  mode = img.mode
  if mode == "RGB":
    return img
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    arr = np.asarray(img).astype(np.float64)
    if mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
      arr = arr * 255.0
    elif arr.size and np.nanmax(arr) > 255:
      arr = arr / 257.0  # 16-bit range -> 8-bit
    arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  if mode == "P":
    img = img.convert("RGBA")  # palette transparency is resolved through RGBA
    mode = "RGBA"
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    # Transparent pixels are composited on white (a plain convert would expose whatever colour
    # the invisible pixels happen to store).
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def decode_image(
    source: str | bytes | os.PathLike,
    *,
    exif_transpose: bool = True,
    max_pixels: int = 89_478_485,
) -> Image.Image:
  """Decodes an image file path or encoded bytes into a PIL RGB image.

  Handles L/LA/RGBA/P/CMYK/I;16/... modes, applies the EXIF orientation (so boxes are read in the
  displayed frame), and refuses images with more than `max_pixels` pixels before decoding them.

  Raises:
    ImageDecodeError: missing, empty, truncated, undecodable or too large.
  """
  try:
    if isinstance(source, (bytes, bytearray, memoryview)):
      data = bytes(source)
      if not data:
        raise ImageDecodeError("image bytes are empty")
      fp = io.BytesIO(data)
    else:
      path = os.fspath(source)
      if not os.path.exists(path):
        raise ImageDecodeError(f"image file not found: {path}")
      if os.path.getsize(path) == 0:
        raise ImageDecodeError(f"image file is empty (0 bytes): {path}")
      with open(path, "rb") as f:
        fp = io.BytesIO(f.read())
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(fp)
      w, h = img.size
      if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image has size {w}x{h}")
      if w * h > max_pixels:
        raise ImageDecodeError(f"image has {w}x{h} pixels, above the limit {max_pixels}")
      img.load()
      if exif_transpose:
        img = ImageOps.exif_transpose(img)
      return to_rgb(img)
  except ImageDecodeError:
    raise
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
    raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from e


def random_resized_crop_params(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: returns (top i, left j, height h, width w)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      i = int(rng.integers(0, height - h + 1))
      j = int(rng.integers(0, width - w + 1))
      return i, j, h, w
  # Fallback: central crop with the aspect clamped to the ratio range.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def region_crop_params(
    box, width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """A random crop (x0, y0, x1, y1) that contains the box [x, y, w, h] (REFERENCE_DETAILED §3.3).

  x0 ~ U{0..floor(x)}, y0 ~ U{0..floor(y)}, x1 ~ U{min(ceil(x+w), W)..W}, y1 likewise.
  """
  x, y, w, h = box
  x0 = int(rng.integers(0, max(int(math.floor(x)), 0) + 1))
  y0 = int(rng.integers(0, max(int(math.floor(y)), 0) + 1))
  x1_lo = min(int(math.ceil(x + w)), width)
  y1_lo = min(int(math.ceil(y + h)), height)
  x1 = int(rng.integers(max(x1_lo, x0 + 1), width + 1))
  y1 = int(rng.integers(max(y1_lo, y0 + 1), height + 1))
  return x0, y0, x1, y1


def resize_square(img: Image.Image, size: int, box=None) -> Image.Image:
  """Bicubic resize to size x size (aspect ratio not kept); `box` = (x0, y0, x1, y1) crops first.

  The crop is explicit (PIL's `resize(box=...)` would let the filter read pixels outside the box).
  """
  if box is not None and tuple(box) != (0, 0, img.width, img.height):
    img = img.crop(tuple(int(v) for v in box))
  return img.resize((size, size), Image.Resampling.BICUBIC)


def hflip(img: Image.Image) -> Image.Image:
  return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


# (v / 255 - CLIP mean) / CLIP std in float32, per channel [3] for every uint8 value v [256].
_NORMALIZED = np.ascontiguousarray(
    ((np.arange(256, dtype=np.float32)[:, None] * np.float32(1.0 / 255.0)) - CLIP_MEAN) / CLIP_STD).T


def normalize(img: Image.Image | np.ndarray) -> np.ndarray:
  """HWC uint8 -> float32 (x / 255 - CLIP mean) / CLIP std.

  uint8 input is looked up per channel in a table of those float32 values: bit for bit the
  arithmetic's result, about 7x faster (numpy broadcasts over a length-3 last axis slowly).
  """
  arr = np.asarray(img)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"normalize expects an RGB image [H, W, 3], got shape {list(arr.shape)}")
  if arr.dtype != np.uint8:
    arr = np.asarray(arr, dtype=np.float32) * (1.0 / 255.0)
    return (arr - CLIP_MEAN) / CLIP_STD
  out = np.empty(arr.shape, np.float32)
  for c in range(3):
    out[..., c] = _NORMALIZED[c][arr[..., c]]
  return out


# ---------------------------------------------------------------------------------------------
# RandAugment (REFERENCE_DETAILED §3.5): N ops sampled with replacement, each applied with p=0.5
# at magnitude M of 10. Enhance factor (M/10)*1.8+0.1; shear +-(M/10)*0.3; translate +-(M/10)*10
# px; rotate +-(M/10)*30 degrees; fill (128, 128, 128).

_FILL = (128, 128, 128)
COLOUR_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness")
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
ALL_OPS = COLOUR_OPS + GEOMETRIC_OPS


def _apply_op(img: Image.Image, name: str, magnitude: float, sign: float) -> Image.Image:
  level = magnitude / 10.0
  if name == "Identity":
    return img
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Brightness":
    return ImageEnhance.Brightness(img).enhance(level * 1.8 + 0.1)
  if name == "Sharpness":
    return ImageEnhance.Sharpness(img).enhance(level * 1.8 + 0.1)
  if name == "ShearX":
    s = sign * level * 0.3
    return img.transform(img.size, Image.Transform.AFFINE, (1, s, 0, 0, 1, 0), fillcolor=_FILL)
  if name == "ShearY":
    s = sign * level * 0.3
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, s, 1, 0), fillcolor=_FILL)
  if name == "TranslateX":
    t = sign * level * 10.0
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, t, 0, 1, 0), fillcolor=_FILL)
  if name == "TranslateY":
    t = sign * level * 10.0
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, t), fillcolor=_FILL)
  if name == "Rotate":
    return img.rotate(sign * level * 30.0, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)
  raise ValueError(f"unknown RandAugment op {name!r}")


def rand_augment(
    img: Image.Image,
    rng: np.random.Generator,
    num_ops: int = 2,
    magnitude: float = 7,
    ops: tuple[str, ...] = COLOUR_OPS,
) -> Image.Image:
  """Applies `num_ops` ops drawn uniformly (with replacement) from `ops`, each with p = 0.5."""
  for _ in range(num_ops):
    name = ops[int(rng.integers(0, len(ops)))]
    apply = rng.random() < 0.5
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if apply:
      img = _apply_op(img, name, magnitude, sign)
  return img
