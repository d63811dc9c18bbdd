"""Data-pipeline configuration: one `ml_collections.ConfigDict`, every field typed by its default.

Config files call `data_config()` and override fields; the returned dict is locked, so a misspelt
key fails at start-up (`cfg.unlock()` first if a config really needs a new field).

    cfg = data_config()
    cfg.vocab_path = "data/vocab.txt"
    cfg.image_text.files = ["data/cc3m/*.jsonl"]      # JSONL, ArrayRecord or "tfds:name:split"
    cfg.regions.files = ["data/vg_regions.array_record"]

Record formats (one JSON object per line / per ArrayRecord record):
  image-text: {"image": path | "image_b64"/"binary": base64, "caption": str | [str, ...]}
  regions:    {"image": ..., "caption": optional str | [str],
               "elems": [{"bbox"|"bb": [x, y, w, h] pixels, "caption": str | [str],
                          "attributes": optional str | [str]}, ...]}
  grounding:  {"image": ..., "text": str, "bbox": [x, y, w, h] pixels}
  vqa:        {"question_id", "image": ..., "question": str, "answer": [str, ...] | str}
  nlvr:       {"images": [path0, path1], "sentence": str, "label": "True" | "False" | bool}
  video_text: {"video": path (file, frame folder or base64 frame list), "caption": str | [str]}
  video_qa:   {"video": path, "question": str, "answer": str | [str]}
  captioning: {"image": ..., "caption": str | [str, ...], optional "image_id"} (COCO Karpathy train)
  (image-text records may carry "image_id": retrieval fine-tuning treats equal ids as positives)

Batch shapes (B = image_text.batch_size, L = max_tokens, M = max_masks, R = image_res,
N = regions.max_images, Rb = regions.batch_size, P = (R / patch)^2): see `pipeline.py`.
"""
from __future__ import annotations

import ml_collections


def _image_text() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          files=(),  # tuple[str]: JSONL / ArrayRecord paths (glob allowed) or "tfds:name:split".
          image_root="",  # relative image paths are joined to this.
          image_key="image",  # path key; base64 bytes are read from "image_b64" or "binary".
          caption_key="caption",
          # Retrieval fine-tuning: pairs with the same image_id are positives of each other
          # (ITC soft targets, never ITM negatives); without the field the image path is the id.
          image_id_key="image_id",
          batch_size=8,  # B, image-text pairs per batch (per process).
          crop_scale_min=0.2,  # RandomResizedCrop scale range (crop_scale_min, 1.0).
          hflip_prob=0.5,
          randaug=True,  # RandAugment(N, M) with colour AND geometric ops (reference pretrain).
      ))


def _regions() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          files=(),
          image_root="",
          image_key="image",
          caption_key="caption",
          max_images=4,  # N_img: images per region batch (static).
          batch_size=8,  # Rb: region-text pairs per batch (static).
          max_regions=5,  # pairs per image, including the whole-image caption pair.
          min_perc_in_image=0.5,
          # Random crop containing a chosen box (reference). False: the whole image, so boxes keep
          # the scale they have at evaluation (small synthetic scenes).
          random_crop=True,  # keep a region if clipped_area / area > this.
          hflip_prob=0.5,
          # Colour-only RandAugment (Identity, AutoContrast, Equalize, Brightness, Sharpness).
          randaug=True,
      ))


def _grounding() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          files=(),  # {"image", "text", "bbox": [x, y, w, h] pixels} records (RefCOCO format)
          image_root="",
          image_key="image",
          caption_key="text",
          batch_size=8,  # B, (image, text, box) triples per batch (per process).
          min_perc_in_image=0.5,
          random_crop=True,  # a random crop that keeps the box (reference), else the whole image
          hflip_prob=0.5,  # flips swap "left"/"right" in the text (data.swap_left_right_on_flip)
          randaug=True,  # colour-only RandAugment, as for regions
      ))


def _vqa() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          files=(),  # {"question_id", "image", "question", "answer": [str, ...] | str} records
          image_root="",
          image_key="image",
          caption_key="question",
          answer_key="answer",
          answer_list="",  # JSON list of candidate answers (model.vqa_num_answers = its length)
          # Generative decoder (batch kind vqa_generative): distinct answers kept per question,
          # tokens per `[CLS] answer [SEP]`, and the weight of a single-string (VG) answer.
          max_answers=10,
          answer_max_tokens=10,
          vg_answer_weight=0.5,
          batch_size=8,
          crop_scale_min=0.5,
          hflip_prob=0.5,  # never when the question or an answer says "left" / "right"
          randaug=True,
      ))


def _nlvr() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          files=(),  # {"images": [path0, path1], "sentence", "label": "True"|"False"|bool}
          image_root="",
          image_key="images",
          caption_key="sentence",
          label_key="label",
          batch_size=8,
          crop_scale_min=0.5,
          hflip_prob=0.5,
          randaug=True,
      ))


def _captioning() -> ml_collections.ConfigDict:
  """COCO captioning as UniLM-style MLM generation (x2vlm_jax/data/captioning.py)."""
  return ml_collections.ConfigDict(
      dict(
          files=(),  # {"image", "caption": str | [str], optional "image_id"} records
          image_root="",
          image_key="image",
          caption_key="caption",
          prompt="a picture of",  # tokens after [CLS] that are never masked (and start decoding)
          # [CLS] prompt caption [SEP] is cut to max_tokens; the caption is used raw (lower-cased
          # by the tokenizer, no pre_caption), as the reference.
          max_tokens=40,
          mask_prob=0.6,  # of the non-prompt tokens (reference: 0.6)
          max_masks=18,  # M; sequences are max_tokens + max_masks long
          batch_size=8,
          crop_scale_min=0.5,
          hflip_prob=0.5,  # "left"/"right" swapped in the caption (data.swap_left_right_on_flip)
          randaug=True,  # RandAugment with colour and geometric ops (reference train transform)
      ))


def _video(**fields) -> ml_collections.ConfigDict:
  """Fields shared by the video sub-configs (x2vlm_jax/data/video.py), then `fields`."""
  return ml_collections.ConfigDict(
      dict(
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
          **fields,
      ))


def _video_text() -> ml_collections.ConfigDict:
  cfg = _video(
      caption_key="caption",
      video_id_key="video_id",  # equal ids (else equal paths) are never each other's negatives
  )
  cfg.crop_scale_min = 0.2  # pre-training transform (fine-tuning configs set 0.5)
  return cfg


def _video_qa() -> ml_collections.ConfigDict:
  return _video(
      caption_key="question",
      answer_key="answer",
      # JSON list of candidate answers, or the reference's {answer: label} file
      # (model.vqa_num_answers = its length); other answers: ignored in training, wrong at test.
      answer_list="",
  )


def data_config() -> ml_collections.ConfigDict:
  """Returns the default (locked) data config; see the module docstring."""
  cfg = ml_collections.ConfigDict(
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
          image_text=_image_text(),
          regions=_regions(),
          grounding=_grounding(),
          vqa=_vqa(),
          nlvr=_nlvr(),
          video_text=_video_text(),
          video_qa=_video_qa(),
          captioning=_captioning(),
          num_workers=0,  # grain worker processes; 0 = decode in this process (threads).
          read_threads=4,  # threads decoding records inside each process.
          prefetch=2,  # batches prefetched (thread prefetch, or per-worker buffer).
          seed=0,
          shuffle=True,  # False reads records in file order (tests, debugging).
          max_bad_fraction=0.01,  # abort (BadDataError) when bad / seen exceeds this ...
          min_records_before_abort=100,  # ... but only after this many records were seen.
          tfds_data_dir="",  # data_dir for "tfds:name:split" entries ("" = TFDS default).
      ))
  cfg.lock()
  return cfg
