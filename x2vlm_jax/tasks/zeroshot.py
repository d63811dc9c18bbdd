"""Zero-shot image classification, the CLIP protocol: an evaluation-only task.

Protocol (evaluator type "zeroshot"):
  1. every class name goes through every prompt template ("{}" is the class: `prompts`), the
     C x T prompts through the text encoder -> L2-normalised ITC text features [C*T, E];
  2. prompt ensembling (`class_embeddings`): per class the mean of its T features, re-normalised
     -> the classifier [C, E];
  3. every image -> its L2-normalised ITC feature [E]; score = cosine with each class [C];
     top-1 / top-5 accuracy from the ranking (ties: the lower class index first, as a stable
     argsort; `rank_classes` on the host, `jax.lax.top_k` on the device);
  4. with `rerank_k` > 0, ITM re-ranking: each image is fused with the prompts of its k best
     classes, and each of them is scored by the mean over the T templates of the raw ITM class-1
     logit (every template, as the ITC side ensembles them: k x T fusion passes per image, its
     keys / values projected once); the k classes are re-ordered by it (ties: the better ITC
     rank first), the rest keep their ITC order -> top1_itm. The C*T prompts' token embeddings
     stay on the device for it (split over the mesh's batch axes).
Images go through the model in fixed-size batches on the mesh (`common.run_batched` over
`eval_data.EvalImages`, decoded a batch at a time); one jitted function per batch encodes them,
scores the classes, takes the top K on the device and re-ranks, so neither an [N, C] matrix nor
the images' embeddings are ever kept. `Predictor.label_features` / `classify` use the same
`DEFAULT_TEMPLATES`, `prompts` and `class_embeddings`.

Data: one source per evaluator entry, one split per file / folder / TFDS split:
  files          JSONL or JSON lists of {"image": path relative to `image_root`, "label": str};
                 split = the file's stem
  image_folders  ImageFolder trees root/<class>/**/*.jpg|jpeg|png|ppm|bmp|pgm|tif|tiff|webp
                 (class = the folder's name); split = the root's name
  tfds_name      a TFDS dataset read through `tfds.data_source(tfds_name, split=s,
                 data_dir=tfds_data_dir)` for each s of `tfds_splits`, with an image feature
                 (`tfds_image_key`) and a ClassLabel (`tfds_label_key`) whose names are the
                 classes (no TensorFlow needed: images are decoded by PIL as evaluation does,
                 by threads: `decode_workers` applies to files and image folders); split =
                 the TFDS split, other characters than letters, digits, "._+-" made "_"
Classes: `classes` names a file with one class a line (the label space and its order); default:
the sorted distinct labels of `files`, the sorted class folders of `image_folders`, the
ClassLabel names (in label order) of TFDS. Templates: `templates` names a file with one template
a line, each holding "{}"; default `DEFAULT_TEMPLATES`.

Metrics, per split, percent: eval/<name>/<split>/top1, top5, mean_per_class (the top-1 accuracy
of each class that has images, averaged), top1_itm (with re-ranking); counts when not zero:
bad_images (unreadable: named in a warning, scored as misses), unknown_labels (labels outside the
class list: named with their records, scored as misses, outside the per-class figures),
empty_classes (class folders without images: named). With `predictions_dir`:
zeroshot_<name>_<split>_confusion.json = {"classes", "counts" [C, C] (row: true class, column:
the predicted top-1, after ITM re-ranking when there is one; readable images of known labels),
"predicted_by", "per_class_top1" [C] (of those predictions; null: no images), "unreadable" [C],
"unknown_labels" {label: images}} and zeroshot_<name>_<split>_predictions.jsonl, one line per
image: {"where", "label", "top" (the 5 best classes), "scores" (their cosines), "top_itm" /
"itm" (the k re-ranked classes and their mean ITM logits), "unreadable"}.

Bad records (no image path, a label that is not a string), a missing image file or a missing
class / template file fail when the evaluator is built, naming the file:line or config field.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import re
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from x2vlm_jax import errors
from x2vlm_jax.data import eval_data, image_ops
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common
from x2vlm_jax.evaluate import retrieval as engine
from x2vlm_jax.tasks import base

BadDataError = eval_data.BadDataError
# The built-in prompt set ("{}" is the class): CLIP's generic photo template and the bare class
# name, which is how captions and referring expressions of the training data name things.
DEFAULT_TEMPLATES = ("a photo of a {}.", "{}")
# ImageFolder's image files (torchvision's list), compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TOP = 5  # the k of top-k accuracy and of the per-image predictions
_NAMED = 10  # distinct bad items named in one warning


# ------------------------------------------------------------------------------ the classifier
def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
  """The templates, refusing none and one without "{}" (errors.InputError)."""
  templates = tuple(templates)
  if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
    raise errors.InputError(f"every template must hold '{{}}' (the label): {list(templates)}")
  return templates


def prompts(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
  """C classes x T templates -> the C*T prompts, class-major: prompt c*T + t is template t with
  class c in place of "{}"."""
  return [t.replace("{}", c) for c in classes for t in templates]


def class_embeddings(text_feat: Any, num_classes: int) -> np.ndarray:
  """Prompt ensembling: text_feat [C*T, E] (the L2-normalised ITC features of `prompts`, in its
  order) -> [C, E] float32, each class the mean of its T features divided by max(its L2 norm,
  1e-12)."""
  feat = np.asarray(text_feat, np.float32)
  mean = feat.reshape(num_classes, len(feat) // num_classes, -1).mean(axis=1)
  return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------ metrics
def rank_classes(scores: np.ndarray, k: int) -> np.ndarray:
  """scores [N, C] -> [N, min(k, C)] class indices, best first; ties: the lower class index
  first (a stable argsort, as `jax.lax.top_k`)."""
  return np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k]


def rerank(ranked: np.ndarray, itm: np.ndarray) -> np.ndarray:
  """ranked [N, K] classes best first, itm [N, k] scores of the first k (k <= K) -> [N, K]: the
  first k re-ordered by itm, highest first (ties: their earlier place), the rest unchanged."""
  k = itm.shape[1]
  order = np.argsort(-np.asarray(itm), axis=1, kind="stable")
  return np.concatenate([np.take_along_axis(ranked[:, :k], order, axis=1), ranked[:, k:]], axis=1)


def topk_accuracy(ranked: np.ndarray, labels: np.ndarray, k: int,
                  miss: np.ndarray | None = None) -> float:
  """Percent of images whose label is among their first k classes. ranked [N, >= k'] (k' =
  min(k, columns)), labels [N] (-1: a label outside the class list, never correct), miss [N]
  bool: rows counted wrong whatever they predict (unreadable images)."""
  labels = np.asarray(labels)
  hit = np.any(np.asarray(ranked)[:, :k] == labels[:, None], axis=1) & (labels >= 0)
  if miss is not None:
    hit &= ~np.asarray(miss, bool)
  return 100.0 * float(np.mean(hit))


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray, num_classes: int,
                       miss: np.ndarray | None = None) -> np.ndarray:
  """[C] float64 percent of each class's images (labels [N] >= 0) whose prediction [N] is that
  class (`miss` rows wrong); NaN for a class without images."""
  labels, predicted = np.asarray(labels), np.asarray(predicted)
  known = labels >= 0
  hit = (predicted == labels) & known
  if miss is not None:
    hit &= ~np.asarray(miss, bool)
  total = np.bincount(labels[known], minlength=num_classes).astype(np.float64)
  correct = np.bincount(labels[hit], minlength=num_classes).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, 100.0 * correct / total, np.nan)


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int,
                     keep: np.ndarray | None = None) -> np.ndarray:
  """[C, C] int64 counts: row = true class, column = predicted class, over the rows with a known
  label (>= 0) and `keep` [N] True."""
  labels, predicted = np.asarray(labels), np.asarray(predicted)
  rows = labels >= 0
  if keep is not None:
    rows &= np.asarray(keep, bool)
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (labels[rows], predicted[rows]), 1)
  return counts


def classification_metrics(ranked: np.ndarray, labels: np.ndarray, num_classes: int,
                           miss: np.ndarray | None = None) -> dict[str, Any]:
  """{top1, top5, mean_per_class: percent floats; per_class: [C] percent (NaN: no images)} of
  rankings [N, K] (best first) against labels [N] (-1: unknown, a miss; `miss` rows: misses).
  mean_per_class averages the classes that have images (0 when none has)."""
  per_class = per_class_accuracy(np.asarray(ranked)[:, 0], labels, num_classes, miss)
  present = ~np.isnan(per_class)
  return dict(top1=topk_accuracy(ranked, labels, 1, miss),
              top5=topk_accuracy(ranked, labels, TOP, miss),
              mean_per_class=float(per_class[present].mean()) if present.any() else 0.0,
              per_class=per_class)


# ------------------------------------------------------------------------------ on the device
def top_classes(sims: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """sims [B, C] -> (values [B, k] float32, classes [B, k] int32), best first; ties: the lower
  class index first (`jax.lax.top_k` is stable)."""
  values, classes = jax.lax.top_k(sims, k)
  return values, classes.astype(jnp.int32)


def make_classify_fn(model) -> Callable[..., Any]:
  """The jitted batch function (module docstring, steps 3-4):

    fn(params, images [B, R, R, 3], class_feat [C, E], text_embeds [>= C*T, L, H] | None,
       text_atts [C*T, L] | None, *, top: K, rerank_k: k, num_templates: T)
      -> (classes [B, K] int32 best first by cosine, cosines [B, K] float32,
          itm [B, k] float32: the mean over the T templates of the raw ITM class-1 logit of the
          image fused with the prompts of each of its first k classes)
  The images arrive split over the mesh's batch axes (`common.run_batched`); the outputs follow.
  """

  def classify(params, images, class_feat, text_embeds, text_atts, *, top, rerank_k,
               num_templates):
    common.TRACE_COUNTS["zeroshot_classify"] += 1

    def f(m, x, cf, te, ta):
      embeds = m.encode_image(x)  # [B, 1+N, D]
      sims = jnp.matmul(m.image_features(embeds), cf.astype(jnp.float32).T,
                        precision=jax.lax.Precision.HIGHEST)  # [B, C]
      values, classes = top_classes(sims, top)
      if not rerank_k:
        return classes, values, jnp.zeros((x.shape[0], 0), jnp.float32)
      b = x.shape[0]
      prompt = (classes[:, :rerank_k, None] * num_templates
                + jnp.arange(num_templates, dtype=jnp.int32))  # [B, k, T]
      text = jnp.take(te, prompt.reshape(-1), axis=0).astype(jnp.float32)  # [B*k*T, L, H]
      atts = jnp.take(ta, prompt.reshape(-1), axis=0)
      fused = m.fuse(embeds, jnp.ones(embeds.shape[:2], jnp.int32), text, atts)
      itm = m.itm_logits(fused)[:, 1].reshape(b, rerank_k, num_templates)
      return classes, values, jnp.mean(itm, axis=-1)

    return model.apply({"params": params}, images, class_feat, text_embeds, text_atts, method=f)

  return jax.jit(classify, static_argnames=("top", "rerank_k", "num_templates"))


# ------------------------------------------------------------------------ class and template files
def _lines(path: str, field: str) -> list[tuple[str, str]]:
  """[(file:line, stripped text)] of the non-empty lines of a text file."""
  if not os.path.isfile(path):
    raise ValueError(f"{field}: no file {path}")
  with open(path, encoding="utf-8") as f:
    return [(f"{path}:{n}", line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def read_classes(path: str, field: str = "classes") -> list[str]:
  """One class a line (empty lines skipped); a repeated class fails naming its line."""
  seen: dict[str, str] = {}
  for where, name in _lines(path, field):
    if name in seen:
      raise ValueError(f"{field}: {where}: class {name!r} repeats {seen[name]}")
    seen[name] = where
  if not seen:
    raise ValueError(f"{field}: {path} lists no class")
  return list(seen)


def read_templates(path: str, field: str = "templates") -> tuple[str, ...]:
  """One template a line, each holding "{}" (a line without it fails naming it)."""
  lines = _lines(path, field)
  for where, template in lines:
    if "{}" not in template:
      raise ValueError(f"{field}: {where}: template {template!r} has no '{{}}' (the class)")
  if not lines:
    raise ValueError(f"{field}: {path} lists no template")
  return tuple(t for _, t in lines)


# ------------------------------------------------------------------------------ readers
@dataclasses.dataclass
class Split:
  """One split as read: images (a row loader: `EvalImages` or `TfdsImages`), where [N] (record
  ids for messages), labels [N] (the label text of each row), classes (the source's own class
  list, the default), empty_classes (class folders without images)."""
  name: str
  images: Any
  where: list[str]
  labels: list[str]
  classes: list[str]
  empty_classes: list[str] = dataclasses.field(default_factory=list)


def read_labelled_records(path: str, image_root: str) -> tuple[list[str], list[str], list[str]]:
  """`{"image", "label": str}` records (JSONL or a JSON list) -> (where [N] "file:line", image
  paths [N] (joined to `image_root`), labels [N] stripped). A record without an image path or
  with a label that is not a non-empty string fails naming it."""
  where, paths, labels = [], [], []
  for w, rec in eval_data.read_split(path, "images"):
    paths.append(eval_data.image_path(rec, w, image_root))
    label = rec.get("label")
    if not isinstance(label, str) or not label.strip():
      raise BadDataError(f"{w}: 'label' must be a non-empty string (the class name), got "
                         f"{label!r}")
    where.append(w)
    labels.append(label.strip())
  return where, paths, labels


def read_image_folder(root: str) -> tuple[list[str], list[str], list[str], list[str]]:
  """An ImageFolder tree root/<class>/**/<image> -> (image paths [N] sorted by class then path,
  labels [N], classes (the sorted class folders, hidden ones skipped), empty classes (those
  without an image file)). Files of other extensions are skipped (logged)."""
  if not os.path.isdir(root):
    raise ValueError(f"no directory {root}")
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
  if not classes:
    raise ValueError(f"{root} has no class folders (root/<class>/<image>)")
  paths, labels, empty, skipped = [], [], [], []
  for name in classes:
    found = []
    for folder, dirs, files in os.walk(os.path.join(root, name), followlinks=True):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for file in sorted(files):
        if file.startswith("."):
          continue
        (found if file.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(
            os.path.join(folder, file))
    paths += found
    labels += [name] * len(found)
    if not found:
      empty.append(name)
  if skipped:
    logging.warning("%s: skipped %d files that are not images (%s), e.g. %s", root, len(skipped),
                    "/".join(IMAGE_EXTENSIONS), skipped[0])
  return paths, labels, classes, empty


class TfdsImages:
  """The images of a TFDS data source as uint8 pixels [R, R, 3] (resized as `EvalImages`, not
  normalised), decoded when read, a batch at a time, by threads: the row loader of
  `common.run_batched` (`load_batches`), with `bad_mask` for the rows that could not be read or
  decoded (a warning names each; their pixels are `image_ops.MEAN_PIXEL`)."""

  def __init__(self, source, image_key: str, where: Sequence[str], image_res: int, *,
               exif_transpose: bool = True, num_threads: int = 4):
    self.source, self.image_key, self.where = source, image_key, list(where)
    self.image_res, self.exif_transpose, self.num_threads = image_res, exif_transpose, num_threads
    self.bad: set[int] = set()

  def __len__(self) -> int:
    return len(self.where)

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice):
      raise TypeError("TfdsImages is read in slices (batches)")
    return self._rows(np.arange(*index.indices(len(self))))

  def load_batches(self, batches: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    for rows in batches:
      yield self._rows(np.asarray(rows))
    self._share_between_processes()

  def bad_mask(self) -> np.ndarray:
    mask = np.zeros(len(self), bool)
    mask[sorted(self.bad)] = True
    return mask

  def _decode(self, row: int) -> tuple[np.ndarray, str | None]:
    try:
      value = self.source[row][self.image_key]
      if isinstance(value, np.ndarray) and value.dtype == np.uint8:  # decoded by TFDS
        img = image_ops.to_rgb(Image.fromarray(np.squeeze(value)))
      else:  # the encoded file (tfds.decode.SkipDecoding)
        img = image_ops.decode_image(bytes(value), exif_transpose=self.exif_transpose)
      return np.asarray(image_ops.resize_square(img, self.image_res), np.uint8), None
    except Exception as e:  # pylint: disable=broad-except  # any unreadable record: a miss
      return image_ops.MEAN_PIXEL, f"{type(e).__name__}: {e}"

  def _rows(self, rows: np.ndarray) -> np.ndarray:
    distinct, inverse = np.unique(rows, return_inverse=True)
    pixels = np.empty((len(distinct), self.image_res, self.image_res, 3), np.uint8)
    with concurrent.futures.ThreadPoolExecutor(max(self.num_threads, 1)) as pool:
      for k, (image, error) in enumerate(pool.map(self._decode, (int(r) for r in distinct))):
        pixels[k] = image
        if error is not None:
          logging.warning("Unreadable evaluation image %s: %s; its row counts as a miss",
                          self.where[int(distinct[k])], error)
          self.bad.add(int(distinct[k]))
    return pixels[inverse.reshape(-1)]

  def _share_between_processes(self) -> None:
    """Every process's unreadable rows merged (each decoded only its own rows)."""
    merged = eval_data.merge_across_processes(self.bad_mask().astype(np.int32))
    self.bad = {int(i) for i in np.flatnonzero(merged)}


def read_tfds(name: str, split: str, data_dir: str, image_key: str, label_key: str,
              image_res: int, *, exif_transpose: bool = True
              ) -> tuple[TfdsImages, list[str], list[str], list[str]]:
  """A TFDS split through `tfds.data_source` -> (images `TfdsImages`, where [N]
  "name/split[i]", labels [N] (each row's ClassLabel name), classes (the ClassLabel's names in
  label order)). The labels are read here (the images are not decoded)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                              decoders={image_key: tfds.decode.SkipDecoding()})
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many types; one line
    raise ValueError(f"tfds.data_source({name!r}, split={split!r}, data_dir={data_dir!r}): "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  features = source.dataset_info.features
  if image_key not in features or label_key not in features:
    raise ValueError(f"TFDS {name}: no feature {image_key!r} or {label_key!r}; features: "
                     f"{sorted(features.keys())}")
  classes = list(getattr(features[label_key], "names", None) or [])
  if not classes:
    raise ValueError(f"TFDS {name}: feature {label_key!r} is not a ClassLabel with names")
  n = len(source)
  if n == 0:
    raise BadDataError(f"TFDS {name}/{split}: no images")
  ids = []
  get_many = getattr(source, "__getitems__", None)
  for start in range(0, n, 1024):
    keys = list(range(start, min(n, start + 1024)))
    recs = get_many(keys) if get_many else [source[k] for k in keys]
    ids += [int(r[label_key]) for r in recs]
  where = [f"{name}/{split}[{i}]" for i in range(n)]
  images = TfdsImages(source, image_key, where, image_res, exif_transpose=exif_transpose)
  return images, where, [classes[i] for i in ids], classes


def label_indices(labels: Sequence[str], where: Sequence[str], classes: Sequence[str]
                  ) -> tuple[np.ndarray, dict[str, list[str]]]:
  """labels [N] -> (indices [N] int64 into `classes`, -1 for a label outside them; {unknown
  label: the where of its rows})."""
  index = {c: k for k, c in enumerate(classes)}
  unknown: dict[str, list[str]] = {}
  out = np.full(len(labels), -1, np.int64)
  for n, (label, w) in enumerate(zip(labels, where)):
    if label in index:
      out[n] = index[label]
    else:
      unknown.setdefault(label, []).append(w)
  return out, unknown


def _metric_split(name: str) -> str:
  """A split name usable in metric and file names ("test[:100]" -> "test__100_")."""
  return re.sub(r"[^\w.+-]", "_", name)


# ------------------------------------------------------------------------------ the evaluator
class ZeroShotEvaluator(common.Evaluator):
  """Zero-shot classification per split (module docstring)."""

  TYPE = "zeroshot"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        files=(),  # {"image", "label"} records (JSONL or JSON lists), one file per split
        image_root="",  # the directory `files`' image paths are relative to
        image_folders=(),  # ImageFolder roots root/<class>/<image>, one per split
        tfds_name="",  # a TFDS dataset (name[/config][:version]) read with tfds.data_source
        tfds_splits=("test",),  # its splits, one metric split each
        tfds_data_dir="",  # where it is prepared ("" = TFDS's default)
        tfds_image_key="image",  # its image feature
        tfds_label_key="label",  # its ClassLabel feature (the names are the classes)
        classes="",  # a file, one class a line ("" = the source's labels: module docstring)
        templates="",  # a file, one prompt template a line with "{}" ("" = DEFAULT_TEMPLATES)
        rerank_k=0,  # > 0: ITM re-ranks each image's k best classes (top1_itm)
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    if int(cfg.rerank_k) < 0:
      raise ValueError(f"{self.field('rerank_k')} = {cfg.rerank_k}: must be >= 0")
    d = config.data
    self.splits = self._read_splits(cfg, config.model.image_res, d.exif_transpose)
    self.classes = (read_classes(cfg.classes, self.field("classes")) if cfg.classes
                    else self._default_classes())
    self.templates = (read_templates(cfg.templates, self.field("templates")) if cfg.templates
                      else DEFAULT_TEMPLATES)
    self.labels = {}
    for split in self.splits:
      self.labels[split.name] = label_indices(split.labels, split.where, self.classes)
      self._warn_bad_labels(split)
    texts = prompts(self.classes, self.templates)
    self.text_ids, self.text_atts = eval_data.encode_texts(
        texts, [f"class {c!r} in template {t!r}" for c in self.classes for t in self.templates],
        text_lib.load_tokenizer(d.vocab_path), d.max_tokens, d.max_words)
    self.num_classes = len(self.classes)
    self.rerank_k = min(int(cfg.rerank_k), self.num_classes)
    self.top = min(self.num_classes, max(TOP, self.rerank_k))
    self.fns = engine.make_retrieval_fns(model, mesh)
    self.fn = make_classify_fn(model)
    self.last_results: dict[str, dict[str, Any]] = {}  # split -> metrics with per_class

  # ---------------------------------------------------------------------------- reading
  def _read_splits(self, cfg, image_res: int, exif_transpose: bool) -> list[Split]:
    sources = [f for f, given in (("files", cfg.files), ("image_folders", cfg.image_folders),
                                  ("tfds_name", cfg.tfds_name)) if given]
    if len(sources) != 1:
      raise ValueError(f"config.evals.{self.name}: set exactly one of files, image_folders, "
                       f"tfds_name (got {sources or 'none'})")
    splits = []
    if cfg.files:
      for path, split in common.named_splits(cfg.files, self.field("files")):
        where, paths, labels = read_labelled_records(path, cfg.image_root)
        eval_data.check_files_exist(paths, where)
        images = eval_data.EvalImages(paths, where, image_res, exif_transpose=exif_transpose,
                                      decode_workers=cfg.decode_workers)
        splits.append(Split(split, images, where, labels, sorted(set(labels))))
    elif cfg.image_folders:
      roots = [os.path.normpath(r) for r in cfg.image_folders]
      for root, split in zip(roots, self._unique([os.path.basename(r) for r in roots],
                                                 "image_folders")):
        try:
          paths, labels, classes, empty = read_image_folder(root)
        except ValueError as e:
          raise ValueError(f"{self.field('image_folders')}: {e}") from e
        if not paths:
          raise BadDataError(f"{self.field('image_folders')}: {root} holds no images")
        images = eval_data.EvalImages(paths, paths, image_res, exif_transpose=exif_transpose,
                                      decode_workers=cfg.decode_workers)
        splits.append(Split(split, images, paths, labels, classes, empty))
    else:
      names = self._unique([_metric_split(s) for s in cfg.tfds_splits], "tfds_splits")
      for tfds_split, split in zip(cfg.tfds_splits, names):
        images, where, labels, classes = read_tfds(
            cfg.tfds_name, tfds_split, cfg.tfds_data_dir, cfg.tfds_image_key,
            cfg.tfds_label_key, image_res, exif_transpose=exif_transpose)
        splits.append(Split(split, images, where, labels, classes))
    return splits

  def _unique(self, names: list[str], key: str) -> list[str]:
    if not names:
      raise ValueError(f"{self.field(key)} is empty")
    if len(set(names)) != len(names):
      raise ValueError(f"{self.field(key)}: two splits share a name: {names}")
    return names

  def _default_classes(self) -> list[str]:
    """The sorted union of the splits' classes (the ClassLabel order for TFDS)."""
    if self.cfg.tfds_name:
      return list(self.splits[0].classes)
    return sorted(set().union(*(s.classes for s in self.splits)))

  def _warn_bad_labels(self, split: Split) -> None:
    _, unknown = self.labels[split.name]
    if unknown:
      named = "; ".join(f"{label!r} x{len(w)} (first {w[0]})"
                        for label, w in list(unknown.items())[:_NAMED])
      more = f"; and {len(unknown) - _NAMED} more labels" if len(unknown) > _NAMED else ""
      self.warn(f"{split.name}: {sum(map(len, unknown.values()))} images have a label outside "
                f"the {len(self.classes)} classes (counted as misses): {named}{more}")
    if split.empty_classes:
      self.warn(f"{split.name}: {len(split.empty_classes)} class folders hold no image: "
                f"{', '.join(split.empty_classes[:_NAMED])}")

  def warn(self, line: str) -> None:
    logging.warning("eval/%s: %s", self.name, line)

  # ---------------------------------------------------------------------------- running
  def classifier(self, params) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(class_feat [C, E] replicated over the mesh, text_embeds [>= C*T, L, H], text_atts
    [C*T, L]; the last two None without re-ranking)."""
    text_embeds, text_feat, text_atts = engine.encode_texts(
        params, self.text_ids, self.text_atts, batch_size=self.batch_size, fns=self.fns,
        mesh=self.mesh)
    class_feat = class_embeddings(jax.device_get(text_feat), self.num_classes)
    if not self.rerank_k:
      text_embeds = text_atts = None
    return common.put_replicated(class_feat, self.mesh), text_embeds, text_atts

  def run(self, params, step=0, *, predictions_dir=None):
    params = common.place_params(params, self.mesh)
    t0 = time.monotonic()
    class_feat, text_embeds, text_atts = self.classifier(params)
    self.log(f"{self.num_classes} classes x {len(self.templates)} templates encoded in "
             f"{time.monotonic() - t0:.1f}s")
    fn = functools.partial(self.fn, top=self.top, rerank_k=self.rerank_k,
                           num_templates=len(self.templates))
    results = {}
    for split in self.splits:
      t0 = time.monotonic()
      ranked, cosines, itm = common.run_batched(
          lambda x: fn(params, x, class_feat, text_embeds, text_atts), (split.images,),
          self.batch_size, self.mesh, name=f"eval/{self.name}/{split.name}", log_every=50)
      ranked, cosines, itm = (np.asarray(jax.device_get(a)) for a in (ranked, cosines, itm))
      bad = split.images.bad_mask()
      labels, unknown = self.labels[split.name]
      metrics = classification_metrics(ranked, labels, self.num_classes, bad)
      final = ranked
      if self.rerank_k:
        final = rerank(ranked, itm)
        metrics["top1_itm"] = topk_accuracy(final, labels, 1, bad)
      counts = dict(bad_images=int(bad.sum()), unknown_labels=int((labels < 0).sum()),
                    empty_classes=len(split.empty_classes))
      self.last_results[split.name] = dict(metrics, **counts)
      for key in ("top1", "top5", "mean_per_class", "top1_itm"):
        if key in metrics:
          results[self.metric_name(split.name, key)] = float(metrics[key])
      results.update({self.metric_name(split.name, k): float(v) for k, v in counts.items() if v})
      self.log(f"{split.name}: {len(ranked)} images in {time.monotonic() - t0:.1f}s, top-1 "
               f"{metrics['top1']:.2f} top-5 {metrics['top5']:.2f} mean per class "
               f"{metrics['mean_per_class']:.2f}"
               + (f" | ITM re-ranked (k={self.rerank_k}) top-1 {metrics['top1_itm']:.2f}"
                  if self.rerank_k else "")
               + "".join(f", {k} {v}" for k, v in counts.items() if v))
      if predictions_dir:
        self.write(predictions_dir, split, ranked, cosines, final, itm, labels, unknown, bad)
    return results

  def write(self, predictions_dir: str, split: Split, ranked, cosines, final, itm, labels,
            unknown, bad) -> None:
    """The confusion file and the per-image predictions (module docstring); `final` [N, K] is
    the ranking after re-ranking (`ranked` without)."""
    stem = f"zeroshot_{self.name}_{split.name}"
    per_class = per_class_accuracy(final[:, 0], labels, self.num_classes, bad)
    unreadable = np.bincount(labels[(labels >= 0) & bad], minlength=self.num_classes)
    common.write_json(predictions_dir, f"{stem}_confusion.json", dict(
        classes=list(self.classes),
        counts=confusion_matrix(final[:, 0], labels, self.num_classes, ~bad).tolist(),
        predicted_by="itm" if self.rerank_k else "itc",
        per_class_top1=[None if np.isnan(v) else round(float(v), 4) for v in per_class],
        unreadable=unreadable.tolist(),
        unknown_labels={label: len(w) for label, w in unknown.items()}))
    with open(os.path.join(predictions_dir, f"{stem}_predictions.jsonl"), "w") as f:
      for n, where in enumerate(split.where):
        row = dict(where=where, label=split.labels[n],
                   top=[self.classes[c] for c in ranked[n, :TOP]],
                   scores=[round(float(s), 5) for s in cosines[n, :TOP]])
        if self.rerank_k:
          row["top_itm"] = [self.classes[c] for c in final[n, :self.rerank_k]]
          row["itm"] = [round(float(s), 4) for s in np.sort(itm[n])[::-1]]
        if bad[n]:
          row["unreadable"] = True
        f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------ the task
class ZeroShotTask(base.Task):
  """Evaluation only: no training objective; its evaluator is configured as
  `config.evals.<name> = common.evaluator("zeroshot", files=..., image_root=..., classes=...)`."""

  name = "zeroshot"
  evaluators = {ZeroShotEvaluator.TYPE: ZeroShotEvaluator}

  def config(self):
    return ml_collections.ConfigDict()  # nothing to configure: it does not train

  def validate(self, config):
    raise ValueError("config.train.tasks.zeroshot: zero-shot classification has no training "
                     "objective; evaluate it with config.evals.<name> = "
                     "common.evaluator('zeroshot', ...) and give it weight 0 or drop it")

  def loss(self, m, batch, rng, *, deterministic, config):
    raise NotImplementedError("zeroshot is evaluation-only (no loss)")


TASK = ZeroShotTask()
