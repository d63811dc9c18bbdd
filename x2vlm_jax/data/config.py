"""Data configuration: the fields every pipeline shares, and the building blocks of task sections.

`config.data` holds the shared fields below plus one section per task (`config.data.<task>`,
the task's own defaults from `x2vlm_jax/tasks/<task>.py`, built with `image_section` /
`video_section`). Every field is typed by its default and the dict is locked, so a misspelt key
fails at start-up.

    config.data.vocab_path = "data/vocab.txt"
    config.data.image_text.files = ["data/cc3m/*.jsonl"]      # JSONL, ArrayRecord or "tfds:name:split"
    config.data.regions.files = ["data/vg_regions.array_record"]

The record format of each task is described in its module (x2vlm_jax/tasks/).
"""
from __future__ import annotations

import ml_collections


def image_section(**fields) -> ml_collections.ConfigDict:
  """The fields of a task section that reads image records, then `fields` (overriding)."""
  return ml_collections.ConfigDict(dict(dict(
      files=(),  # tuple[str]: JSONL / JSON-list / ArrayRecord paths (glob allowed) or tfds:name:split
      image_root="",  # relative image paths are joined to this.
      image_key="image",  # path key; base64 bytes are read from "image_b64" or "binary".
      caption_key="caption",  # the text of the record
      batch_size=8,  # examples per batch (per process).
      crop_scale_min=0.5,  # RandomResizedCrop scale range (crop_scale_min, 1.0).
      hflip_prob=0.5,
      randaug=True,  # RandAugment(N, M) (data.randaug_num_ops / randaug_magnitude).
  ), **fields))


def video_section(**fields) -> ml_collections.ConfigDict:
  """The fields of a task section that reads video records (x2vlm_jax/data/video.py), then
  `fields` (overriding)."""
  return ml_collections.ConfigDict(dict(dict(
      files=(),
      video_root="",  # relative video paths are joined to this.
      video_key="video",  # a video file, a folder of frames or a JSON list of base64 frames.
      batch_size=8,  # B, clips per batch (per process).
      num_frames=3,  # F, frames per clip (model.num_frames holds their embeddings).
      # Training: "random_segment" (one random frame in each of F equal segments, reference),
      # "uniform" (the first frame of each segment) or "fps" (one frame per second, then
      # uniform); evaluation uses "uniform", or "fps" when this is "fps".
      sampling="random_segment",
      min_frames=1,  # fewer frames: a bad record (shorter clips repeat frames, as reference)
      frame_folder_fps=1.0,  # frame rate of frame folders / frame lists ("fps" sampling)
      crop_scale_min=0.5,  # ONE RandomResizedCrop (crop_scale_min, 1.0) for all frames
      hflip_prob=0.5,  # ONE flip decision per clip
      randaug=True,  # ONE RandAugment draw per clip (colour and geometric ops)
  ), **fields))


def data_config() -> ml_collections.ConfigDict:
  """The shared data fields (unlocked: `configs/common.base_config` adds the task sections)."""
  return ml_collections.ConfigDict(
      dict(
          vocab_path="",  # BERT WordPiece vocab.txt (ids of [PAD]/[CLS]/... are read from it).
          max_tokens=40,  # L: [CLS] text [SEP] padded/truncated to this.
          max_words=40,  # pre_caption keeps this many words.
          mask_prob=0.5,
          max_masks=12,  # M
          skipgram_prb=0.2,
          skipgram_size=3,
          mask_whole_word=True,
          # Our fix: swap "left"/"right" in captions when an image is flipped.
          # False reproduces the reference (captions never rewritten).
          swap_left_right_on_flip=True,
          randaug_num_ops=2,  # N
          randaug_magnitude=7,  # M (of 10)
          exif_transpose=True,  # boxes are read in the EXIF-rotated (displayed) frame.
          max_image_pixels=89_478_485,  # decompression-bomb guard (PIL's default limit).
          num_workers=0,  # grain worker processes; 0 = decode in this process (threads).
          read_threads=4,  # threads decoding records inside each process.
          prefetch=2,  # batches prefetched (thread prefetch, or per-worker buffer).
          seed=0,
          shuffle=True,  # False reads records in file order (tests, debugging).
          max_bad_fraction=0.01,  # abort (BadDataError) when bad / seen exceeds this ...
          min_records_before_abort=100,  # ... but only after this many records were seen.
          tfds_data_dir="",  # data_dir for "tfds:name:split" entries ("" = TFDS default).
      ))
