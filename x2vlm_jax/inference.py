"""Inference on your own pictures: embeddings, scores, boxes, answers, captions and classes.

  predictor = Predictor.load("runs/demo")  # a workdir or params dir: its config and tokenizer
  img_feat = predictor.embed_images(["a.jpg", pil_image, uint8_array])    # [N, E], unit norm
  txt_feat = predictor.embed_texts(["a red circle", "a blue square"])     # [M, E], unit norm
  scores = predictor.score(images, texts)      # itc [N, M] cosine, itm [N, M] P(match)
  x, y, w, h = predictor.ground("a.jpg", "the red circle")               # original pixels
  predictor.answer(["a.jpg"], ["what colour is the circle"])  # [{"answer", "score"}] (VQA)
  predictor.caption(["a.jpg"], beam_size=3)                   # ["a red circle left of ..."]
  predictor.nlvr([("a.jpg", "b.jpg")], ["the left image has a red circle"])
                                                              # [{"label", "prob_true"}]
  predictor.classify(["a.jpg"], ["cat", "dog"], top_k=1)     # [[{"label", "score"}]]

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

The task heads answer as their evaluators do (x2vlm_jax/tasks), with the settings of the
checkpoint's config (its `config.evals` entry of that type, else the evaluator's defaults):
  answer    VQA. The classification head (task `vqa`, mode "head"): the arg-max of
            `config.data.vqa.answer_list` (`vqa.vqa_logits`), score = sigmoid of its logit. The
            answer decoder (task `vqa_generative`): mode "rank" ranks
            `config.data.vqa_generative.answer_list` as its evaluator does
            (`vqa_generative.rank_answers`, `k_test` candidates), score = the answer's share of
            the softmax over them; mode "generate" decodes free-form answers (greedy, or beam
            search with `beam_size` > 1; `evaluate/generation.py`), score = p(answer [SEP] |
            question) under the decoder. Mode "auto": "head" when the model has it, else "rank".
            `answers=` replaces the configured list (a checkpoint saves the list's path, not the
            list).
  caption   the captioning evaluator's decoding (`captioning.generate_captions`: its prompt,
            beams, min / max length, length penalty; `beam_size` / `max_len` override).
  nlvr      the NLVR2 head (`nlvr2.nlvr_logits`): label = its arg-max as the evaluator takes it,
            prob_true = softmax(logits)[1].
  classify  zero-shot, CLIP protocol: every label through every template (`DEFAULT_TEMPLATES`:
            "a photo of a {}." and "{}"), the ITC text features averaged per label and
            re-normalised; score = cosine with the image's ITC feature.
A method whose head the model lacks raises `errors.InputError` naming the checkpoint's tasks and
the recipe that trains the head. An image given several times (the same path or object) is
decoded once.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from x2vlm_jax import boxes, errors, losses, tasks
from x2vlm_jax.data import eval_data, examples, image_ops
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common, generation, retrieval
from x2vlm_jax.tasks import captioning, nlvr2, vqa, vqa_generative, zeroshot

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
_run_batched = common.run_batched  # fixed-size batches, padding dropped
# Zero-shot classification prompts ("{}" is the label), shared with the zero-shot evaluator.
DEFAULT_TEMPLATES = zeroshot.DEFAULT_TEMPLATES
VQA_MODES = ("auto", "head", "rank", "generate")


def load_image(image: ImageLike, *, exif_transpose: bool = True) -> Image.Image:
  """A path, PIL image or uint8 array ([H, W], [H, W, 3] or [H, W, 4]) -> PIL RGB image.

  Raises:
    errors.InputError (a ValueError): an unreadable / undecodable file (naming it) or an array of
      another shape / dtype.
  """
  if isinstance(image, (str, os.PathLike)):
    try:
      return image_ops.decode_image(image, exif_transpose=exif_transpose)
    except image_ops.ImageDecodeError as e:
      raise errors.InputError(f"cannot read image {os.fspath(image)}: {e}") from e
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                            and image.shape[2] in (3, 4))):
      raise errors.InputError(f"image array must be uint8 [H, W, 3] (or [H, W] / [H, W, 4]), got "
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
    errors.InputError (a ValueError): a text that is empty after cleaning (naming its index).
  """
  try:
    return eval_data.encode_texts(texts, [f"text {k}" for k in range(len(texts))], tokenizer,
                                  max_tokens, max_words)
  except eval_data.BadDataError as e:
    raise errors.InputError(str(e)) from e


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
    raise errors.InputError(f"no {name} given")
  return items


def _pair_up(images, texts, what: str) -> tuple[list, list[str]]:
  """images[i] with texts[i] (one image goes with every text, one text with every image) ->
  two lists of the same length."""
  images, texts = _image_list(images), _text_list(texts)
  if len(images) == 1 and len(texts) > 1:
    images = images * len(texts)
  elif len(texts) == 1 and len(images) > 1:
    texts = texts * len(images)
  if len(images) != len(texts):
    raise errors.InputError(f"{len(images)} images but {len(texts)} {what}: give one per image, "
                            "or one for all")
  return images, texts


def _distinct(items: Sequence) -> tuple[list, np.ndarray]:
  """items -> (the distinct ones in first-seen order, index [N] of each item among them): the
  same path (compared absolute) or the same object given twice counts once."""
  slots: dict[Any, int] = {}
  distinct, index = [], []
  for item in items:
    key = (os.path.abspath(os.fspath(item)) if isinstance(item, (str, os.PathLike))
           else id(item))
    if key not in slots:
      slots[key] = len(distinct)
      distinct.append(item)
    index.append(slots[key])
  return distinct, np.asarray(index, np.int64)


def top_labels(scores: np.ndarray, labels: Sequence[str], top_k: int) -> list[list[dict]]:
  """scores [N, C] (image x label) -> per image its `top_k` best [{"label", "score"}], best
  first (ties: the earlier label)."""
  if top_k < 1:
    raise errors.InputError(f"top_k must be >= 1, got {top_k}")
  order = zeroshot.rank_classes(scores, top_k)
  return [[{"label": labels[c], "score": float(row[c])} for c in best]
          for row, best in zip(scores, order)]


# ------------------------------------------------------------------------------ head functions
def _vqa_best(m, images, ids, atts):
  """Bound model: images [B, R, R, 3], questions ids/atts [B, L] -> (answer index [B] i32: the
  arg-max of the classification head, as `vqa.make_vqa_fn`; score [B] f32: sigmoid of its
  logit)."""
  logits = vqa.vqa_logits(m, dict(image=images, text_ids=ids, text_atts=atts))
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return best, jax.nn.sigmoid(jnp.take_along_axis(logits, best[:, None], axis=-1)[:, 0])


def _rank_best(m, images, ids, atts, answer_ids, answer_atts, k: int):
  """Bound model: the decoder's best answer of the list `answer_ids/atts [A, La]` by
  `vqa_generative.rank_answers` -> (index [B] i32, its softmax share among the k [B] f32)."""
  ranked, probs = vqa_generative.rank_answers(
      m, dict(image=images, text_ids=ids, text_atts=atts), answer_ids, answer_atts, k)
  return ranked[:, 0], probs[:, 0]


class Predictor:
  """A model, its params and tokenizer, ready for `embed_*`, `score`, `ground*`, `answer`,
  `caption`, `nlvr` and `classify`."""

  def __init__(self, model, params, tokenizer: text_lib.Tokenizer, image_res: int,
               max_tokens: int, *, max_words: int | None = None, batch_size: int = 8,
               config=None):
    """model: an `X2VLM`; params: its (unboxed) params, host or device arrays; image_res: R;
    max_tokens: L; max_words: caption words kept (default L); batch_size: rows per jitted call;
    config: the checkpoint's config (its tasks, answer lists, caption prompt and evaluator
    settings; default: the tasks' and evaluators' defaults)."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.config = config
    self._jitted: dict[Any, Callable] = {}
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
  def load(cls, checkpoint: str, config=None, *, vocab_path: str | None = None,
           batch_size: int = 8) -> "Predictor":
    """A checkpoint ready for inference: a training workdir (its latest checkpoint), a step
    directory `workdir/checkpoints/<step>` or a params dir (`tools/convert_checkpoint.py`).

    Args:
      checkpoint: the directory.
      config: the model's config (a ConfigDict or a `--config` spec: `.py[:arg]`, `config.json`,
        a directory); default: the config saved with the checkpoint (`saved_config.py`). The
        model is built with the heads of its tasks; parameters of other heads the checkpoint
        holds are not loaded.
      vocab_path: the tokenizer; default: the one saved with the checkpoint, else
        `config.data.vocab_path` (the answer lists of its heads also come from the checkpoint).
      batch_size: rows per jitted call.

    Raises:
      errors.InputError: no such checkpoint, no config given or saved, a checkpoint of another
        model (naming the differing parameters), a tokenizer larger than the model's vocabulary.
    """
    from x2vlm_jax import errors, saved_config, tasks  # pylint: disable=import-outside-toplevel
    from x2vlm_jax.configs_loader import load_config  # pylint: disable=import-outside-toplevel
    from x2vlm_jax.models import loading  # pylint: disable=import-outside-toplevel

    checkpoint = os.fspath(checkpoint)
    if not os.path.isdir(checkpoint):
      raise errors.InputError(f"checkpoint {checkpoint}: no such directory (a training workdir, "
                              "its checkpoints/<step>, or a params dir from "
                              "tools/convert_checkpoint.py)")
    if config is None:
      config = saved_config.for_checkpoint(checkpoint)
      if config is None:
        raise errors.InputError(f"checkpoint {checkpoint} has no config.json (made before "
                                "checkpoints described themselves): pass its config (--config "
                                "configs/NAME.py)")
    elif isinstance(config, str):
      config = load_config(config)
    home = saved_config.checkpoint_home(checkpoint)
    if home is not None:  # the tokenizer and answer lists it was trained with
      config = saved_config.use_assets(config, home)
    vocab_path = vocab_path or config.data.vocab_path
    tokenizer = text_lib.load_tokenizer(saved_config.tokenizer_file(vocab_path))
    if tokenizer.vocab_size > config.model.vocab_size:
      raise errors.InputError(f"tokenizer {tokenizer.vocab_path} has {tokenizer.vocab_size} "
                              f"tokens, more than config.model.vocab_size "
                              f"{config.model.vocab_size}: not this model's tokenizer")
    model = tasks.build_model(config)
    params, _ = loading.load_params(model, checkpoint, ignore_unexpected=("*",))
    return cls(model, params, tokenizer, config.model.image_res, config.data.max_tokens,
               max_words=config.data.max_words, batch_size=batch_size, config=config)

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

  # ------------------------------------------------------------------------------------------
  # Task heads.

  def _cached(self, key, make: Callable[[], Callable]) -> Callable:
    """The jitted function `make()` built once per `key`."""
    if key not in self._jitted:
      self._jitted[key] = make()
    return self._jitted[key]

  def _section(self, task_name: str):
    """`config.data.<task_name>`, or the task's default section without a config."""
    if self.config is not None and task_name in self.config.data:
      return self.config.data[task_name]
    return tasks.get(task_name).config()

  def _evaluator_settings(self, type_name: str):
    """The config's first `config.evals` entry of `type_name`, else that type's defaults."""
    if self.config is not None:
      for entry in self.config.evals.values():
        if entry.get("type") == type_name:
          return entry
    return tasks.evaluator_types()[type_name].default_config()

  def _missing(self, what: str, recipe: str) -> errors.InputError:
    """The error of a method whose head the model lacks, naming what the checkpoint has."""
    if self.config is not None:
      trained = sorted(n for n, w in self.config.train.tasks.items() if w > 0)
      has = f"it was trained for tasks {trained}"
    else:
      has = f"its model has the heads {[h.name for h in self.model.heads]}"
    return errors.InputError(f"checkpoint has no {what}: {has}; fine-tune with {recipe}")

  def _has_head(self, name: str) -> bool:
    return any(h.name == name for h in self.model.heads)

  def _pixels_for(self, images: Sequence) -> np.ndarray:
    """A list of images (repeats allowed) -> [N, R, R, 3], each distinct image decoded once."""
    distinct, index = _distinct(images)
    return self.prepare_images(distinct)[0][index]

  def _answer_list(self, section: str, answers: Sequence[str] | None) -> list[str]:
    """`answers`, else the list `config.data.<section>.answer_list` names."""
    if answers is not None:
      answers = [str(a) for a in answers]
      return _non_empty(answers, "answers")
    field = f"config.data.{section}.answer_list"
    path = self._section(section).answer_list
    if not path:
      raise errors.InputError(f"{field} is empty: pass the candidate answers (answers=, "
                              "--answers FILE)")
    try:
      return examples.load_answer_list(path, field)
    except ValueError as e:
      raise errors.InputError(f"{e}; pass the candidate answers (answers=, --answers FILE)") from e

  def _vqa_mode(self, mode: str) -> str:
    """`mode` checked against the model's VQA heads; "auto" -> "head" or "rank"."""
    if mode not in VQA_MODES:
      raise errors.InputError(f"VQA mode {mode!r}: one of {', '.join(VQA_MODES)}")
    has_head, has_decoder = self._has_head(vqa.HEAD), self.model.answer_decoder_layers > 0
    if not (has_head or has_decoder):
      raise self._missing("VQA head (classification head or answer decoder)",
                          "configs/finetune/vqa.py (answer decoder) or "
                          "configs/finetune/vqa_classification.py (classification head)")
    if mode == "auto":
      return "head" if has_head else "rank"
    if mode == "head" and not has_head:
      raise self._missing("VQA classification head", "configs/finetune/vqa_classification.py")
    if mode in ("rank", "generate") and not has_decoder:
      raise self._missing("VQA answer decoder", "configs/finetune/vqa.py")
    return mode

  def answer(self, images, questions, *, answers: Sequence[str] | None = None,
             mode: str = "auto", beam_size: int = 1, max_len: int | None = None,
             k: int | None = None) -> list[dict]:
    """VQA: images[i] answers questions[i] (one image for every question, or one question for
    every image) -> [{"answer": str, "score": float}] per question (module docstring).

    Args:
      answers: the candidate answers (mode "head": one per logit of the head; "rank": any list);
        default: the config's answer list.
      mode: "auto", "head", "rank" or "generate".
      beam_size: "generate": 1 greedy, > 1 beam search.
      max_len: "generate": tokens generated at most, [SEP] included (default
        `answer_max_tokens` - 1).
      k: "rank": candidates re-scored (default the evaluator's `k_test`).
    Raises:
      errors.InputError: no VQA head of that mode, no answer list, inputs that do not pair up.
    """
    mode = self._vqa_mode(mode)
    images, questions = _pair_up(images, questions, "questions")
    pixels = self._pixels_for(images)
    ids, atts = self.prepare_texts(questions)
    if mode == "generate":
      return self._generate_answers(pixels, ids, atts, beam_size, max_len)
    section = "vqa" if mode == "head" else "vqa_generative"
    candidates = self._answer_list(section, answers)
    if mode == "head":
      fn = self._head_answer_fn(len(candidates))
    else:
      fn = self._rank_answer_fn(candidates, k)
    best, score = _run_batched(lambda x, i, a: fn(self.params, x, i, a), (pixels, ids, atts),
                               self.batch_size, None)
    return [{"answer": candidates[int(b)], "score": float(p)}
            for b, p in zip(np.asarray(best), np.asarray(score, np.float32))]

  def _head_answer_fn(self, num_answers: int) -> Callable:
    outputs = self.model.head(vqa.HEAD).outputs
    if outputs != num_answers:
      raise errors.InputError(f"the VQA head has {outputs} answer logits but the answer list "
                              f"has {num_answers} answers: give the list it was trained with")
    return self._cached("vqa_head", lambda: jax.jit(lambda p, x, i, a: self.model.apply(
        {"params": p}, x, i, a, method=_vqa_best)))

  def _rank_answer_fn(self, candidates: list[str], k: int | None) -> Callable:
    k = int(self._evaluator_settings("vqa_generative").k_test if k is None else k)
    if k < 1:
      raise errors.InputError(f"k (answers re-scored) must be >= 1, got {k}")
    answer_ids, answer_atts = vqa_generative.tokenize_answers(
        candidates, self.tokenizer, self._section("vqa_generative").answer_max_tokens)
    return self._cached(("vqa_rank", tuple(candidates), k), lambda: jax.jit(
        lambda p, x, i, a: self.model.apply({"params": p}, x, i, a, answer_ids, answer_atts, k,
                                            method=_rank_best)))

  def _generate_answers(self, pixels, ids, atts, beam_size: int, max_len: int | None
                        ) -> list[dict]:
    """Free-form answers of the decoder, each scored by p(answer [SEP] | question)."""
    if max_len is None:
      max_len = int(self._section("vqa_generative").answer_max_tokens) - 1
    if beam_size < 1 or max_len < 1 or 1 + max_len > self.model.max_position:
      raise errors.InputError(f"beam_size {beam_size} must be >= 1 and max_len {max_len} in "
                              f"1..{self.model.max_position - 1} (config.model.max_position "
                              f"{self.model.max_position} holds [CLS] + the answer)")
    tok = self.tokenizer
    rules = dict(num_beams=beam_size, max_length=max_len, cls_id=tok.cls_id, eos_id=tok.sep_id,
                 mask_id=tok.mask_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    fn = self._cached(("vqa_generate", beam_size, max_len),
                      lambda: vqa_generative.make_answer_generator(self.model, **rules))

    def batch_answers(x, i, a):
      """A batch -> its answers as `[CLS] answer [SEP]` ids [B, 1 + max_len], -1 after."""
      sequences = vqa_generative.generated_sequences(fn(self.params, x, i, a), beam_size,
                                                     tok.sep_id)
      rows = np.full((len(sequences), 1 + max_len), -1, np.int32)
      for row, seq in zip(rows, sequences):
        row[: 1 + len(seq)] = [tok.cls_id] + seq
      return rows

    rows = np.asarray(_run_batched(batch_answers, (pixels, ids, atts), self.batch_size, None))
    answer_atts = (rows >= 0).astype(np.int32)
    answer_ids = np.where(rows >= 0, rows, tok.pad_id).astype(np.int32)
    nll_fn = self._cached("vqa_answer_nll", lambda: jax.jit(lambda p, *a: self.model.apply(
        {"params": p}, *a, method=vqa_generative.answer_nll)))
    nll = _run_batched(lambda *a: nll_fn(self.params, *a),
                       (pixels, ids, atts, answer_ids, answer_atts), self.batch_size, None)
    return [{"answer": generation.decode_text(tok, [t for t in row if t >= 0]),
             "score": float(np.exp(-n))} for row, n in zip(rows.tolist(), np.asarray(nll))]

  def caption(self, images, *, beam_size: int | None = None, max_len: int | None = None,
              min_len: int | None = None) -> list[str]:
    """One caption per image, decoded as the captioning evaluator decodes
    (`captioning.generate_captions`: `config.data.captioning.prompt`, the evaluator's beams,
    min / max length and length penalty, its tokenizer decoding). `max_len` defaults to the
    evaluator's, cut to what the position table holds after [CLS] + the prompt.

    Raises:
      errors.InputError: a model without the MLM head, a max_len that does not fit.
    """
    if not self.model.mlm_head:
      raise self._missing("MLM head to caption with", "configs/finetune/coco_captioning.py")
    settings = self._evaluator_settings("captioning")
    prompt = captioning.prompt_ids(self.tokenizer, self._section("captioning").prompt)
    beams = int(settings.beams if beam_size is None else beam_size)
    if max_len is None:
      max_len = min(int(settings.max_length), self.model.max_position - len(prompt))
    min_len = int(settings.min_length if min_len is None else min_len)
    if beams < 1 or max_len < 1:
      raise errors.InputError(f"beam_size {beams} and max_len {max_len} must be >= 1")
    try:
      captioning.check_caption_length(prompt, max_len, self.model.max_position, "max_len")
    except ValueError as e:
      raise errors.InputError(str(e)) from e
    rules = dict(num_beams=beams, max_length=max_len, min_length=min_len,
                 length_penalty=float(settings.length_penalty))
    tok = self.tokenizer
    fn = self._cached(("caption",) + tuple(rules.items()), lambda: captioning.make_caption_fn(
        self.model, prompt, eos_id=tok.sep_id, mask_id=tok.mask_id, pad_id=tok.pad_id,
        vocab_size=tok.vocab_size, **rules))
    return captioning.generate_captions(self.model, self.params, self._pixels_for(
        _image_list(images)), tok, prompt, batch_size=self.batch_size, fn=fn, **rules)

  def nlvr(self, image_pairs, sentences) -> list[dict]:
    """NLVR2: is sentences[i] true of image_pairs[i] = (left, right)? (one pair for every
    sentence, or one sentence for every pair) -> [{"label": bool, "prob_true": float}]: the
    head's arg-max as the nlvr2 evaluator takes it, softmax(logits)[1].

    Raises:
      errors.InputError: no NLVR2 head, a pair that is not two images.
    """
    if not self._has_head(nlvr2.HEAD):
      raise self._missing("NLVR2 head", "configs/finetune/nlvr2.py")
    pairs = [tuple(p) for p in _non_empty(list(image_pairs), "image pairs")]
    if any(len(p) != 2 for p in pairs):
      raise errors.InputError("each NLVR2 input is a pair of images (left, right)")
    pairs, sentences = _pair_up(pairs, sentences, "sentences")
    pixels = self._pixels_for([im for pair in pairs for im in pair])
    ids, atts = self.prepare_texts(sentences)
    fn = self._cached("nlvr", lambda: jax.jit(lambda p, x0, x1, i, a: _label_and_prob(
        self.model.apply({"params": p}, dict(image0=x0, image1=x1, text_ids=i, text_atts=a),
                         method=nlvr2.nlvr_logits))))
    label, prob = _run_batched(lambda *a: fn(self.params, *a),
                               (pixels[0::2], pixels[1::2], ids, atts), self.batch_size, None)
    return [{"label": bool(b == 1), "prob_true": float(p)}
            for b, p in zip(np.asarray(label), np.asarray(prob, np.float32))]

  def label_features(self, labels: Sequence[str], templates: Sequence[str] | None = None
                     ) -> np.ndarray:
    """[C, E] float32 zero-shot classifier: each label through each template ("{}" is the label;
    default `DEFAULT_TEMPLATES`), the L2-normalised ITC text features averaged per label and
    re-normalised (CLIP's protocol: `tasks.zeroshot.class_embeddings`, as the zero-shot
    evaluator)."""
    labels = _text_list(labels)
    templates = zeroshot.check_templates(DEFAULT_TEMPLATES if templates is None
                                         else _text_list(templates))
    feats = self.embed_texts(zeroshot.prompts(labels, templates))
    return zeroshot.class_embeddings(feats, len(labels))

  def classify(self, images, labels: Sequence[str], templates: Sequence[str] | None = None, *,
               top_k: int = 5) -> list[list[dict]]:
    """Zero-shot classification: per image its `top_k` labels [{"label", "score"}] best first,
    score = cosine of the image's ITC feature with `label_features(labels, templates)`."""
    labels = _text_list(labels)
    scores = self.embed_images(images) @ self.label_features(labels, templates).T
    return top_labels(scores, labels, top_k)


def _label_and_prob(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[B, 2] NLVR2 logits -> (arg-max [B] i32, softmax(logits)[:, 1] [B])."""
  return (jnp.argmax(logits, axis=-1).astype(jnp.int32),
          jax.nn.softmax(logits, axis=-1)[:, 1])

