"""Video records -> training examples and batches; the clips of video evaluation sets.

The pieces the video tasks (x2vlm_jax/tasks/video_*.py) share. A record's "video" path is relative
to `video_root` and names a video file, a folder of frames or a JSON list of base64 frames
(`video.py`). A task's section (`config.data.<task>`, `data.config.video_section`) sets the
frames: `num_frames`, `sampling`, `min_frames`, `frame_folder_fps`, and the augmentation.

  VideoProcessor       base of the video processors: reads the clip and augments it (below)
  VideoTextProcessor   `{"video", "caption": str | [str, ...], optional "video_id"}` -> a
                       video-text example (the records of video-text pre-training and of video
                       retrieval fine-tuning)
  collate_video_text   video-text examples -> batch
  check_num_frames     a section's frames must fit the model's frame embeddings
  video_paths          evaluation records -> their resolved video paths
  load_eval_clips      paths -> [N, F, R, R, 3] uint8 (deterministic sampling, test transform)

Video-text example (F = num_frames, R = image_res, L = max_tokens, M = max_masks):
  frames [F, R, R, 3] f32; text_ids, text_atts, text_ids_masked [L] i32; masked_pos, masked_ids
  [M] i32; video_idx i32 (a stable hash of video_id, else of the path: equal for the captions of
  one video).
Transform: F frames sampled (`sampling`), then ONE RandomResizedCrop(scale=(crop_scale_min, 1)),
  ONE flip decision and ONE RandAugment draw applied to every frame of the clip, CLIP
  normalisation. A flip swaps "left"/"right" in a caption (data.swap_left_right_on_flip, as for
  images).
Batches (B = batch_size): frames [B, F, R, R, 3] f32 and the stacked example fields.
Any unusable evaluation record or video raises BadDataError naming it.
"""
from __future__ import annotations

import concurrent.futures
import logging
import types
from typing import Sequence

import numpy as np
from PIL import Image

from x2vlm_jax.data import examples as examples_lib
from x2vlm_jax.data import image_ops
from x2vlm_jax.data import pipeline
from x2vlm_jax.data import records
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.data import video as video_lib

BadDataError = records.BadDataError
BadRecordError = records.BadRecordError


def check_num_frames(num_frames: int, model_cfg, field: str) -> None:
  """ValueError naming `field` (e.g. "config.data.video_text.num_frames") when the clips have
  more frames than the model has frame embeddings (`model.num_frames` > 0); checked before
  anything compiles."""
  if model_cfg.num_frames > 0 and num_frames > model_cfg.num_frames:
    raise ValueError(f"{field} is {num_frames} but the model has {model_cfg.num_frames} frame "
                     "embeddings (config.model.num_frames)")


class VideoProcessor(examples_lib.Processor):
  """Shared parts of the video processors: reading and augmenting the clip.

  cfg: `config.data` (the shared fields); sub: the task's video section (`video_root`,
  `video_key`, `caption_key`, the frame and augmentation fields).
  """

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    image_fields = types.SimpleNamespace(
        image_root=sub.video_root, image_key=sub.video_key, caption_key=sub.caption_key,
        hflip_prob=sub.hflip_prob, randaug=sub.randaug)
    super().__init__(cfg, image_fields, image_res, patch_size, encoder)
    if sub.sampling not in video_lib.SAMPLINGS:
      raise ValueError(f"data video sampling {sub.sampling!r}: expected one of "
                       f"{video_lib.SAMPLINGS}")
    if sub.num_frames < 1:
      raise ValueError(f"data video num_frames must be >= 1, got {sub.num_frames}")
    self.num_frames = int(sub.num_frames)
    self.sampling = sub.sampling
    self.min_frames = int(sub.min_frames)
    self.folder_fps = float(sub.frame_folder_fps)
    self.crop_scale = (float(sub.crop_scale_min), 1.0)

  def video_path(self, rec: dict) -> str:
    """The record's video path, joined to `video_root`."""
    if self.image_key not in rec:
      raise BadRecordError(f"record has no {self.image_key!r} (keys {sorted(rec)})")
    return video_lib.resolve_path(rec[self.image_key], self.image_root)

  def clip(self, rec: dict, rng: np.random.Generator, flipped: bool) -> np.ndarray:
    """Samples and augments the clip -> [F, R, R, 3] f32: every frame goes through `_augment`
    with a generator seeded alike, so all get the same crop and RandAugment ops."""
    clip = video_lib.read_clip(self.video_path(rec), self.num_frames, self.sampling, rng,
                               min_frames=self.min_frames, folder_fps=self.folder_fps)
    seed = int(rng.integers(0, 2**63))
    return np.stack([self._augment(Image.fromarray(f), np.random.default_rng(seed),
                                   self.crop_scale, flipped) for f in clip.frames])


class VideoTextProcessor(VideoProcessor):
  """`{"video", "caption"}` record -> video-text example (module docstring)."""

  def __init__(self, cfg, sub, image_res: int, patch_size: int, encoder: text_lib.TextEncoder):
    super().__init__(cfg, sub, image_res, patch_size, encoder)
    self.video_id_key = sub.video_id_key

  def process(self, where: str, rec: dict, rng: np.random.Generator) -> dict:
    caption = self._choose_caption(rec, rng)
    flipped = bool(rng.random() < self.hflip_prob)
    caption = self._flip_text(caption, flipped)
    frames = self.clip(rec, rng, flipped)
    out = self.encoder(caption, rng)
    out["frames"] = frames
    video_id = rec.get(self.video_id_key)
    out["video_idx"] = np.int32(examples_lib.stable_id(
        video_id if video_id is not None else rec[self.image_key]))
    return out


VIDEO_TEXT_FIELDS = dict(text_ids=np.int32, text_atts=np.int32, text_ids_masked=np.int32,
                         masked_pos=np.int32, masked_ids=np.int32, video_idx=np.int32,
                         frames=np.float32)


def collate_video_text(examples: Sequence[dict], rng: np.random.Generator | None = None) -> dict:
  """Video-text examples -> {frames [B,F,R,R,3] f32, text_ids, text_atts, text_ids_masked [B,L],
  masked_pos, masked_ids [B,M], video_idx [B] i32}. `rng` is unused."""
  del rng
  return pipeline.stack_fields(examples, VIDEO_TEXT_FIELDS)


# ------------------------------------------------------------------------------------ evaluation


def video_paths(recs: Sequence[tuple[str, dict]], video_key: str, video_root: str) -> list[str]:
  """The video path of each (where, record), joined to `video_root`; a record without one
  raises BadDataError naming it."""
  paths = []
  for where, rec in recs:
    try:
      paths.append(video_lib.resolve_path(rec.get(video_key), video_root))
    except BadRecordError as e:
      raise BadDataError(f"{where}: {e}") from e
  return paths


def load_eval_clips(paths: Sequence[str], where: Sequence[str], *, num_frames: int,
                    image_res: int, sampling: str = "uniform", folder_fps: float = 1.0,
                    num_threads: int = 4, bad: set[int] | None = None,
                    offset: int = 0) -> np.ndarray:
  """[N, F, R, R, 3] uint8: each video's deterministic frames (`sampling`: uniform or fps) through
  the test transform (resized; normalised on the device by `X2VLM.encode_video`). A video that
  cannot be read raises BadDataError naming its record; with a `bad` set, it is named in a
  warning instead, its clip left at the mean pixel (`image_ops.MEAN_PIXEL`, as an unreadable
  evaluation image) and its index (+ `offset`) added to `bad`, for the evaluators to score its
  rows as misses."""
  if sampling == "random_segment":
    raise ValueError("evaluation sampling must be deterministic (uniform or fps)")
  out = np.empty((len(paths), num_frames, image_res, image_res, 3), np.uint8)
  out[...] = image_ops.MEAN_PIXEL

  def load(k):
    try:
      clip = video_lib.read_clip(paths[k], num_frames, sampling, folder_fps=folder_fps)
    except video_lib.VideoDecodeError as e:
      if bad is None:
        raise BadDataError(f"{where[k]}: {e}") from e
      logging.warning("Unreadable evaluation video %s (%s): %s; its rows count as misses",
                      where[k], paths[k], e)
      bad.add(offset + k)
      return
    out[k] = video_lib.eval_transform(clip, image_res)

  with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
    list(pool.map(load, range(len(paths))))
  return out
