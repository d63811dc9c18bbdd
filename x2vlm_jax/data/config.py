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
