"""Video-text pre-training (stage 2, REFERENCE_DETAILED §2.6): ITC + ITM with hard negatives + MLM
on clips, exactly as for images with the video's embeddings.

Records `{"video": path, "caption": str | [str, ...], optional "video_id"}` (one caption drawn
per visit; the path, relative to `video_root`, is a video file, a folder of frames or a JSON list
of base64 frames: x2vlm_jax/data/video.py), JSONL / JSON list / ArrayRecord.
Example and batch: `data.video_examples.VideoTextProcessor`, `collate_video_text`:
frames [B, F, R, R, 3] f32; text_ids / text_atts / text_ids_masked [B, L] i32; masked_pos /
masked_ids [B, M] i32; video_idx [B] i32 (a hash of video_id, else of the path). Transform: F
frames sampled (`sampling`), ONE RandomResizedCrop(scale=(crop_scale_min, 1)), flip and
RandAugment draw for every frame of a clip (captions' "left"/"right" swapped on a flip).
Objective: `X2VLM.encode_video` (per-frame ViT + frame embedding, mean over frames), then
`objectives.aligning_losses` -> {itc, itm, mlm}. `num_frames` must not exceed
`config.model.num_frames` (when > 0). No evaluator (video retrieval: tasks/video_retrieval.py).
"""
from __future__ import annotations

import jax.numpy as jnp

from x2vlm_jax import objectives
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.data import video_examples
from x2vlm_jax.tasks import base


def video_text_section(**fields):
  """The section of a task that reads video-caption records (this task, video_retrieval)."""
  return data_config.video_section(**dict(dict(
      caption_key="caption",
      video_id_key="video_id",  # equal ids (else equal paths) are never each other's negatives
  ), **fields))


def video_text_loss(m, batch, rng, *, deterministic: bool, config, with_mlm: bool = True):
  """ITC + ITM (+ MLM) of a video-text batch (`frames [B, F, R, R, 3]` + the text fields); with
  `with_mlm=False` captions of the same video (equal `video_idx`) share the ITC target mass and
  are never each other's ITM negatives."""
  video_embeds = m.encode_video(batch["frames"], deterministic)
  video_atts = jnp.ones(video_embeds.shape[:2], jnp.int32)
  return objectives.aligning_losses(
      m, video_embeds, video_atts, batch, rng, deterministic=deterministic,
      idx=None if with_mlm else batch["video_idx"],
      itc_feature_grad_scale=config.train.itc_feature_grad_scale, with_mlm=with_mlm)


def video_text_processor(task: base.Task, config, tokenizer: text_lib.Tokenizer):
  """The `VideoTextProcessor` of `task`'s section."""
  encoder = text_lib.TextEncoder.from_config(config.data, tokenizer)
  return video_examples.VideoTextProcessor(config.data, task.section(config),
                                           config.model.image_res, config.model.patch_size,
                                           encoder)


class VideoTextTask(base.Task):
  """See the module docstring."""

  name = "video_text"
  loss_terms = ("itc", "itm", "mlm")

  def config(self):
    return video_text_section(crop_scale_min=0.2)  # pre-training transform (fine-tuning: 0.5)

  def validate(self, config):
    super().validate(config)
    video_examples.check_num_frames(self.section(config).num_frames, config.model,
                                    self.field("num_frames"))

  def processor(self, config, tokenizer):
    return video_text_processor(self, config, tokenizer)

  def collate(self, config):
    return video_examples.collate_video_text

  def loss(self, m, batch, rng, *, deterministic, config):
    return video_text_loss(m, batch, rng, deterministic=deterministic, config=config)


TASK = VideoTextTask()
