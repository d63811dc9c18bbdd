"""Numerical parity with the PyTorch reference on a golden fixture folder.

A fixture folder (made by running the reference) holds `manifest.json` (config, input/output names,
state-dict shapes, notes), `checkpoint.th`, `inputs.npz` and `outputs.npz`. `check_fixture` builds
the model from the manifest, converts the checkpoint, recomputes every output in `outputs.npz` and
reports the max abs error of each. An output name that this module does not know how to compute is
reported as a failure, never skipped.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp

from x2vlm_jax import convert, losses
from x2vlm_jax.models.x2vlm import X2VLM


def model_from_manifest(manifest: dict) -> X2VLM:
  """Build the `X2VLM` whose sizes the fixture's manifest describes (float32, eval)."""
  cfg, text, vision = manifest["config"], manifest["config"]["text"], manifest["config"]["vision"]
  keys = manifest.get("state_dict", {})
  frame_key = keys.get("absolute_frame_pos_embed")
  return X2VLM(
      image_res=cfg["image_res"], patch_size=cfg["patch_size"], vision_width=vision["width"],
      vision_depth=vision["depth"], vision_heads=vision["heads"],
      vision_mlp_dim=int(vision["width"] * vision.get("mlp_ratio", 4)),
      vision_layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
      num_frames=frame_key[1] if frame_key else 0,
      vocab_size=text["vocab_size"], text_width=text["hidden_size"],
      text_layers=cfg["text_fusion_start_at"],
      fusion_layers=cfg["text_num_hidden_layers"] - cfg["text_fusion_start_at"],
      text_heads=text["num_attention_heads"], text_mlp_dim=text["intermediate_size"],
      max_position=text["max_position_embeddings"], type_vocab_size=text.get("type_vocab_size", 2),
      text_layer_norm_eps=text.get("layer_norm_eps", 1e-12),
      fusion_layer_norm_eps=text.get("layer_norm_eps", 1e-12),  # one BERT config for all layers
      mlm_head=any(k.startswith("text_encoder.cls.") for k in keys) if keys else True,
      embed_dim=cfg["embed_dim"], temp_init=cfg.get("temp", 0.07), drop_path_rate=0.0,
      hidden_dropout=0.0, attention_dropout=0.0)


class _Session:
  """Lazily computed intermediate values shared between outputs."""

  def __init__(self, model: X2VLM, params, inputs: dict[str, np.ndarray]):
    self.model, self.variables, self.inputs, self.cache = model, {"params": params}, inputs, {}

  def call(self, method, *args):
    return self.model.apply(self.variables, *args, method=method)

  def get(self, name: str):
    if name not in self.cache:
      self.cache[name] = _INTERMEDIATES[name](self)
    return self.cache[name]

  def x(self, name, dtype=None):
    value = self.inputs[name]
    if name in ("image",):
      value = value.transpose(0, 2, 3, 1)  # NCHW (reference) -> NHWC
    return jnp.asarray(value if dtype is None else value.astype(dtype))


def _ones(embeds):
  return jnp.ones(embeds.shape[:2], jnp.int32)


def _itm(s: _Session, vision, vision_atts, text, text_atts):
  cross = s.call(X2VLM.fuse, vision, vision_atts, text, text_atts)
  return s.call(X2VLM.itm_logits, cross)


_INTERMEDIATES: dict[str, Callable[[_Session], object]] = {
    "image_embeds": lambda s: s.call(X2VLM.encode_image, s.x("image")),
    "text_embeds": lambda s: s.call(X2VLM.encode_text, s.x("text_ids", np.int32),
                                    s.x("text_atts", np.int32)),
    "regions": lambda s: s.call(X2VLM.encode_regions, s.x("image"),
                                s.x("region_image_atts", np.int32),
                                s.x("idx_to_group_img", np.int32)),
    "region_text_embeds": lambda s: s.call(X2VLM.encode_text, s.x("region_text_ids", np.int32),
                                           s.x("region_text_atts", np.int32)),
    "image_feat": lambda s: s.call(X2VLM.image_features, s.get("image_embeds")),
    "text_feat": lambda s: s.call(X2VLM.text_features, s.get("text_embeds")),
    "region_feat": lambda s: s.call(X2VLM.image_features, s.get("regions")[0]),
    "region_text_feat": lambda s: s.call(X2VLM.text_features, s.get("region_text_embeds")),
    "temp": lambda s: s.call(X2VLM.clamped_temp),
    "bbox_pred": lambda s: s.call(X2VLM.predict_box, s.call(
        X2VLM.fuse, s.get("regions")[1], _ones(s.get("regions")[1]), s.get("region_text_embeds"),
        s.x("region_text_atts", np.int32))),
    "box_losses": lambda s: losses.box_losses(s.get("bbox_pred"), s.x("target_bbox"),
                                              s.x("is_image")),
}


def _image_itm(s: _Session, image_index, text_index):
  image, text = s.get("image_embeds"), s.get("text_embeds")
  atts = s.x("text_atts", np.int32)
  return _itm(s, image[image_index], _ones(image), text[text_index], atts[text_index])


def _arange(s: _Session):
  return np.arange(s.inputs["text_ids"].shape[0])


# Output name -> how to compute it (see the fixture manifest's notes).
OUTPUTS: dict[str, Callable[[_Session], object]] = {
    "image_embeds": lambda s: s.get("image_embeds"),
    "region_embeds": lambda s: s.get("regions")[0],
    "region_full_embeds": lambda s: s.get("regions")[1],
    "text_embeds": lambda s: s.get("text_embeds"),
    "image_feat": lambda s: s.get("image_feat"),
    "text_feat": lambda s: s.get("text_feat"),
    "itc_loss": lambda s: losses.itc_loss(s.get("image_feat"), s.get("text_feat"), s.get("temp")),
    "itc_sim_i2t": lambda s: s.get("image_feat") @ s.get("text_feat").T / s.get("temp"),
    "cross_embeds": lambda s: s.call(X2VLM.fuse, s.get("image_embeds"),
                                     _ones(s.get("image_embeds")), s.get("text_embeds"),
                                     s.x("text_atts", np.int32)),
    "itm_logits_pos": lambda s: _image_itm(s, _arange(s), _arange(s)),
    "itm_logits_neg_image": lambda s: _image_itm(s, s.inputs["itm_neg_image_idx"], _arange(s)),
    "itm_logits_neg_text": lambda s: _image_itm(s, _arange(s), s.inputs["itm_neg_text_idx"]),
    "itm_loss_given_negatives": lambda s: losses.itm_loss(
        OUTPUTS["itm_logits_pos"](s),
        jnp.concatenate([OUTPUTS["itm_logits_neg_image"](s), OUTPUTS["itm_logits_neg_text"](s)])),
    "mlm_logits": lambda s: s.call(X2VLM.mlm_logits, s.x("text_ids_masked", np.int32),
                                   s.x("text_atts", np.int32), s.get("image_embeds"),
                                   _ones(s.get("image_embeds")), s.x("masked_pos", np.int32)),
    "mlm_loss": lambda s: losses.mlm_loss(OUTPUTS["mlm_logits"](s), s.x("masked_ids", np.int32)),
    "region_text_embeds": lambda s: s.get("region_text_embeds"),
    "region_feat": lambda s: s.get("region_feat"),
    "region_text_feat": lambda s: s.get("region_text_feat"),
    "region_cross_embeds": lambda s: s.call(X2VLM.fuse, s.get("regions")[0],
                                            s.x("region_image_atts", np.int32),
                                            s.get("region_text_embeds"),
                                            s.x("region_text_atts", np.int32)),
    "region_itm_logits_pos": lambda s: s.call(X2VLM.itm_logits, OUTPUTS["region_cross_embeds"](s)),
    "bbox_pred": lambda s: s.get("bbox_pred"),
    "bbox_l1_loss": lambda s: s.get("box_losses")[0],
    "bbox_giou_loss": lambda s: s.get("box_losses")[1],
    "region_forward_itc_loss": lambda s: losses.itc_loss(s.get("region_feat"),
                                                         s.get("region_text_feat"), s.get("temp")),
    "region_forward_bbox_loss": lambda s: s.get("box_losses")[0],
    "region_forward_giou_loss": lambda s: s.get("box_losses")[1],
}


def check_fixture(fixture_dir: str, *, rtol_scale: float = 1e-4, **model_overrides) -> list[dict]:
  """Recompute every output of a fixture folder (with `model_overrides`, e.g. scan_layers=True,
  applied to the model the manifest describes).

  Returns one row per output: name, shape, max_abs_err, tolerance (rtol_scale * max(1, max|ref|)),
  ok, and error (why it could not be computed, if so).
  """
  with open(os.path.join(fixture_dir, "manifest.json")) as f:
    manifest = json.load(f)
  model = model_from_manifest(manifest).clone(**model_overrides)
  params, _ = convert.convert_checkpoint(os.path.join(fixture_dir, "checkpoint.th"), model)
  inputs = dict(np.load(os.path.join(fixture_dir, "inputs.npz")))
  expected = dict(np.load(os.path.join(fixture_dir, "outputs.npz")))
  session = _Session(model, jax.tree_util.tree_map(jnp.asarray, params), inputs)
  rows = []
  for name, reference in expected.items():
    reference = np.asarray(reference, np.float64)
    tol = rtol_scale * max(1.0, float(np.max(np.abs(reference))) if reference.size else 1.0)
    row = dict(name=name, shape=list(reference.shape), tolerance=tol)
    if name not in OUTPUTS:
      rows.append(dict(row, max_abs_err=float("nan"), ok=False,
                       error="no computation known for this output"))
      continue
    try:
      ours = np.asarray(OUTPUTS[name](session), np.float64).reshape(reference.shape)
    except Exception as e:  # reported per output so one failure does not hide the others
      rows.append(dict(row, max_abs_err=float("nan"), ok=False, error=f"{type(e).__name__}: {e}"))
      continue
    err = float(np.max(np.abs(ours - reference))) if reference.size else 0.0
    rows.append(dict(row, max_abs_err=err, ok=bool(err <= tol), error=""))
  return rows
