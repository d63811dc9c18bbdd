"""Inference on your own pictures: embeddings, image-text scores and the boxes texts refer to.

  from x2vlm_jax.configs_loader import load_config
  predictor = Predictor.load(load_config("configs/demo.py"), "runs/demo")  # workdir or params dir
  img_feat = predictor.embed_images(["a.jpg", pil_image, uint8_array])    # [N, E], unit norm
  txt_feat = predictor.embed_texts(["a red circle", "a blue square"])     # [M, E], unit norm
  scores = predictor.score(images, texts)      # itc [N, M] cosine, itm [N, M] P(match)
  x, y, w, h = predictor.ground("a.jpg", "the red circle")               # original pixels

Images are a path, a PIL image or an HxWx3 uint8 array of any size. They are read as evaluation
reads them (`image_ops.decode_image`: EXIF orientation applied, any mode converted to RGB) and
transformed as evaluation does (bicubic resize to R x R, aspect not kept, CLIP normalisation), so
boxes are in the pixels of the displayed (EXIF-rotated) original. Texts are cleaned and tokenized
as evaluation does ([CLS] WordPiece [SEP], padded to `max_tokens`).

`images` arguments take one image, a sequence of them, or a stacked [N, H, W, 3] uint8 array;
`texts` one string or a sequence. Encoding and scoring run through the jitted evaluation
functions (`evaluate.retrieval.make_retrieval_fns`), boxes through `X2VLM.predict_box_in_image`, in
fixed-size batches (the last one padded), so each function compiles once whatever the number of
inputs.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import jax
import numpy as np
from PIL import Image, ImageOps

from x2vlm_jax import boxes
from x2vlm_jax.data import eval_data, image_ops
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common, retrieval

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
_run_batched = common.run_batched  # fixed-size batches, padding dropped


def load_image(image: ImageLike, *, exif_transpose: bool = True) -> Image.Image:
  """A path, PIL image or uint8 array ([H, W], [H, W, 3] or [H, W, 4]) -> PIL RGB image.

  Raises:
    ValueError: an unreadable / undecodable file (naming it) or an array of another shape / dtype.
  """
  if isinstance(image, (str, os.PathLike)):
    try:
      return image_ops.decode_image(image, exif_transpose=exif_transpose)
    except image_ops.ImageDecodeError as e:
      raise ValueError(f"cannot read image {os.fspath(image)}: {e}") from e
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                            and image.shape[2] in (3, 4))):
      raise ValueError(f"image array must be uint8 [H, W, 3] (or [H, W] / [H, W, 4]), got "
                       f"{image.dtype} {list(image.shape)}")
    return image_ops.to_rgb(Image.fromarray(np.ascontiguousarray(image)))
  if isinstance(image, Image.Image):
    return image_ops.to_rgb(ImageOps.exif_transpose(image) if exif_transpose else image)
  raise TypeError(f"expected an image path, PIL image or uint8 array, got {type(image).__name__}")


def preprocess_image(image: Image.Image, image_res: int) -> np.ndarray:
  """PIL RGB image -> [R, R, 3] float32, the evaluation transform (`eval_data.load_eval_images`)."""
  return image_ops.normalize(image_ops.resize_square(image, image_res))


def encode_texts(texts: Sequence[str], tokenizer: text_lib.Tokenizer, max_tokens: int,
                 max_words: int) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> (ids [M, L] int32, atts [M, L] int32), L = max_tokens, as evaluation encodes them.

  Raises:
    ValueError: a text that is empty after cleaning (naming its index).
  """
  try:
    return eval_data.encode_texts(texts, [f"text {k}" for k in range(len(texts))], tokenizer,
                                  max_tokens, max_words)
  except eval_data.BadDataError as e:
    raise ValueError(str(e)) from e


def _predict_boxes(m, images, ids, atts):
  """Bound model: images [B, R, R, 3], texts ids/atts [B, L] -> [B, 4] float32 normalised
  (cx, cy, w, h) of each text's box in its image."""
  return m.predict_box_in_image(m.encode_image(images), m.encode_text(ids, atts),
                                atts).astype(jax.numpy.float32)


def _image_list(images) -> list:
  """One image (or a stacked [N, H, W, C] array) or a sequence of images -> a non-empty list."""
  if isinstance(images, (str, os.PathLike, Image.Image)) or (
      isinstance(images, np.ndarray) and images.ndim <= 3):
    return [images]
  return _non_empty(list(images), "images")


def _text_list(texts) -> list[str]:
  return [texts] if isinstance(texts, str) else _non_empty(list(texts), "texts")


def _non_empty(items: list, name: str) -> list:
  if not items:
    raise ValueError(f"no {name} given")
  return items


class Predictor:
  """A model, its params and tokenizer, ready for `embed_*`, `score` and `ground*`."""

  def __init__(self, model, params, tokenizer: text_lib.Tokenizer, image_res: int,
               max_tokens: int, *, max_words: int | None = None, batch_size: int = 8):
    """model: an `X2VLM`; params: its (unboxed) params, host or device arrays; image_res: R;
    max_tokens: L; max_words: caption words kept (default L); batch_size: rows per jitted call."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model = model
    self.params = jax.device_put(jax.device_get(params))  # one device, sent once
    self.tokenizer = tokenizer
    self.image_res = int(image_res)
    self.max_tokens = int(max_tokens)
    self.max_words = self.max_tokens if max_words is None else int(max_words)
    self.batch_size = int(batch_size)
    self._fns = retrieval.make_retrieval_fns(model)
    self._boxes = jax.jit(lambda p, x, i, a: model.apply(
        {"params": p}, x, i, a, method=_predict_boxes))

  @classmethod
  def load(cls, config, checkpoint: str, vocab_path: str | None = None, *,
           batch_size: int = 8) -> "Predictor":
    """From a config and a training workdir (latest checkpoint in `checkpoint/checkpoints`) or an
    Orbax params dir (`tools/convert_checkpoint.py`, `checkpoint.save_params`): the model of the
    config with the heads of its tasks, loaded by `models.loading.load_params`."""
    from x2vlm_jax import tasks  # pylint: disable=import-outside-toplevel
    from x2vlm_jax.models import loading  # pylint: disable=import-outside-toplevel

    tokenizer = text_lib.load_tokenizer(vocab_path or config.data.vocab_path)
    if tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(f"vocab {tokenizer.vocab_path} has {tokenizer.vocab_size} tokens, more than "
                       f"config.model.vocab_size {config.model.vocab_size}")
    model = tasks.build_model(config)
    params, _ = loading.load_params(model, checkpoint,
                                    ignore_unexpected=tuple(config.init.ignore_unexpected))
    return cls(model, params, tokenizer, config.model.image_res, config.data.max_tokens,
               max_words=config.data.max_words, batch_size=batch_size)

  # ------------------------------------------------------------------------------------------
  # Inputs.

  def prepare_images(self, images) -> tuple[np.ndarray, np.ndarray]:
    """Images (one or a sequence) -> (pixels [N, R, R, 3] float32, sizes [N, 2] int (W, H))."""
    pil = [load_image(im) for im in _image_list(images)]
    pixels = np.stack([preprocess_image(im, self.image_res) for im in pil])
    return pixels, np.array([im.size for im in pil], np.int32)

  def prepare_texts(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """Texts (one or a sequence) -> (ids [M, L] int32, atts [M, L] int32)."""
    return encode_texts(_text_list(texts), self.tokenizer, self.max_tokens, self.max_words)

  # ------------------------------------------------------------------------------------------
  # Model.

  def _encode_images(self, pixels: np.ndarray):
    """[N, R, R, 3] -> (embeds [N, 1+P, D], feat [N, E]) device arrays."""
    return _run_batched(lambda x: self._fns["encode_images"](self.params, x), (pixels,),
                        self.batch_size, None)

  def _encode_texts(self, ids: np.ndarray, atts: np.ndarray):
    """[M, L] x2 -> (embeds [M, L, H], feat [M, E]) device arrays."""
    return _run_batched(lambda i, a: self._fns["encode_texts"](self.params, i, a), (ids, atts),
                        self.batch_size, None)

  def embed_images(self, images) -> np.ndarray:
    """[N, E] float32 L2-normalised ITC image features."""
    _, feat = self._encode_images(self.prepare_images(images)[0])
    return np.asarray(feat, np.float32)

  def embed_texts(self, texts) -> np.ndarray:
    """[M, E] float32 L2-normalised ITC text features."""
    _, feat = self._encode_texts(*self.prepare_texts(texts))
    return np.asarray(feat, np.float32)

  def score(self, images, texts) -> dict[str, np.ndarray]:
    """Every image against every text: dict(itc [N, M] cosine similarity of the ITC features
    (`embed_images(images) @ embed_texts(texts).T`), itm [N, M] ITM match probability
    softmax(logits)[..., 1]), float32. Costs N * M fusion passes."""
    image_embeds, image_feat = self._encode_images(self.prepare_images(images)[0])
    ids, atts = self.prepare_texts(texts)
    text_embeds, text_feat = self._encode_texts(ids, atts)
    n, m = len(image_feat), len(text_feat)
    img_idx, txt_idx = (a.ravel().astype(np.int32) for a in np.indices((n, m)))
    atts = jax.device_put(atts)
    itm = _run_batched(
        lambda i, t: jax.nn.softmax(self._fns["pair_itm"](
            self.params, image_embeds, text_embeds, atts, i, t), axis=-1)[:, 1],
        (img_idx, txt_idx), self.batch_size, None)
    itc = np.asarray(image_feat, np.float32) @ np.asarray(text_feat, np.float32).T
    return dict(itc=itc, itm=np.asarray(itm, np.float32).reshape(n, m))

  def ground_batch(self, images, texts) -> np.ndarray:
    """images[i] with texts[i] -> [N, 4] float64 boxes (x, y, w, h) in original-image pixels
    (the box head's normalised (cx, cy, w, h) times the original (W, H); not clipped)."""
    pixels, sizes = self.prepare_images(images)
    ids, atts = self.prepare_texts(texts)
    if len(ids) != len(pixels):
      raise ValueError(f"ground_batch: {len(pixels)} images but {len(ids)} texts")
    predicted = _run_batched(lambda x, i, a: self._boxes(self.params, x, i, a),
                             (pixels, ids, atts), self.batch_size, None)
    return boxes.cxcywh_norm_to_xywh_pixels(np.asarray(predicted, np.float64), sizes)

  def ground(self, image: ImageLike, text: str) -> tuple[float, float, float, float]:
    """The box (x, y, w, h) of `text` in `image`, in original-image pixels."""
    return tuple(float(v) for v in self.ground_batch([image], [text])[0])
