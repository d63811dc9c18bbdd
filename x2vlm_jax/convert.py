"""Released PyTorch X2-VLM checkpoints -> Flax params: one name table plus reshapes.

Accepted inputs: `torch.load(path)` giving `{'model': state_dict, ...}` or a bare state dict, with
text keys as pre-training releases write them (`text_encoder.bert.*`, MLM head `text_encoder.cls.*`)
or as fine-tuned releases write them (`text_encoder.*`, no MLM head); a release with an answer
decoder (`text_decoder.bert.*`, `text_decoder.cls.*`) goes to `answer_decoder/...`.

XLM-R text encoders are rewritten onto that layout first (`canonical_keys`): a transformers
XLMRobertaModel / XLMRobertaForMaskedLM state dict (`roberta.*` or bare, MLM head `lm_head.*`) and
the reference's CCLM / multilingual X2-VLM layout (`XVLMPlusBase`: XLM-R `text_encoder.*`, BERT
fusion layers `cross_encoder.encoder.layer.*`, untied MLM head `mlm_head.predictions.*`).

Buffers are checked, not loaded: `relative_position_index` must equal the index our model builds,
`position_ids` must be `arange`, and the MLM decoder must be tied to the word embeddings (unless
the model has its own decoder, `model.mlm_decoder_tied=False`, which then receives it).
Relative position tables are resized when the checkpoint was trained at another image resolution.
Any unmatched checkpoint key, missing model parameter or shape mismatch raises `ConversionError`
with a short report (`mismatch_report`): one summary line, each differing parameter once (layers
with the same difference grouped, long lists capped), and the config fields the checkpoint's
shapes imply (`implied_model_fields`).

torch is imported only inside `load_torch_state_dict` (conversion time), never by training code.
"""
from __future__ import annotations

import fnmatch
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from x2vlm_jax import errors
from x2vlm_jax.models.vit import relative_position_index


class ConversionError(errors.InputError):
  """The file is not a usable checkpoint or does not match the model; the message is the report
  (command lines print it without a traceback)."""


# Kinds of tensors and how each becomes a Flax array.
def _linear(w: np.ndarray) -> np.ndarray:  # torch [out, in] -> flax kernel [in, out]
  return w.T


def _conv(w: np.ndarray) -> np.ndarray:  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
  return w.transpose(2, 3, 1, 0)


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _frames(w: np.ndarray) -> np.ndarray:  # [1, F, 1, D] -> [F, 1, D]
  return w.reshape(w.shape[1:])


_T = r"text_encoder\.(?:bert\.|roberta\.)?"
_L = r"encoder\.layer\.(\d+)\."
_B = r"vision_encoder\.blocks\.(\d+)\."

# (torch key regex, flax path template, transform). Read top to bottom: it is the whole mapping.
NAME_TABLE: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (r"temp", "temp", _same),
    (r"vision_encoder\.cls_token", "vision/cls_token", _same),
    (r"vision_encoder\.pos_embed", "vision/pos_embed", _same),
    (r"vision_encoder\.patch_embed\.proj\.weight", "vision/patch_embed/kernel", _conv),
    (r"vision_encoder\.patch_embed\.proj\.bias", "vision/patch_embed/bias", _same),
    (_B + r"gamma_([12])", r"vision/blocks_\1/gamma_\2", _same),
    (_B + r"(norm[12])\.weight", r"vision/blocks_\1/\2/scale", _same),
    (_B + r"(norm[12])\.bias", r"vision/blocks_\1/\2/bias", _same),
    (_B + r"attn\.qkv\.weight", r"vision/blocks_\1/attn/qkv/kernel", _linear),
    (_B + r"attn\.(q_bias|v_bias)", r"vision/blocks_\1/attn/\2", _same),
    (_B + r"attn\.relative_position_bias_table", r"vision/blocks_\1/attn/relative_position_bias_table", _same),
    (_B + r"attn\.proj\.weight", r"vision/blocks_\1/attn/proj/kernel", _linear),
    (_B + r"attn\.proj\.bias", r"vision/blocks_\1/attn/proj/bias", _same),
    (_B + r"mlp\.(fc[12])\.weight", r"vision/blocks_\1/mlp/\2/kernel", _linear),
    (_B + r"mlp\.(fc[12])\.bias", r"vision/blocks_\1/mlp/\2/bias", _same),
    (r"vision_encoder\.fc_norm\.weight", "vision/fc_norm/scale", _same),
    (r"vision_encoder\.fc_norm\.bias", "vision/fc_norm/bias", _same),
    (r"absolute_frame_pos_embed", "frame_pos_embed", _frames),
    (_T + r"embeddings\.(word|position|token_type)_embeddings\.weight",
     r"text/embeddings/\1_embeddings/embedding", _same),
    (_T + r"embeddings\.LayerNorm\.weight", "text/embeddings/LayerNorm/scale", _same),
    (_T + r"embeddings\.LayerNorm\.bias", "text/embeddings/LayerNorm/bias", _same),
    (_T + _L + r"(attention|crossattention)\.self\.(query|key|value)\.weight",
     r"text/layer_\1/\2/self/\3/kernel", _linear),
    (_T + _L + r"(attention|crossattention)\.self\.(query|key|value)\.bias",
     r"text/layer_\1/\2/self/\3/bias", _same),
    (_T + _L + r"(attention|crossattention)\.output\.dense\.weight",
     r"text/layer_\1/\2/output/dense/kernel", _linear),
    (_T + _L + r"(attention|crossattention)\.output\.dense\.bias",
     r"text/layer_\1/\2/output/dense/bias", _same),
    (_T + _L + r"(attention|crossattention)\.output\.LayerNorm\.weight",
     r"text/layer_\1/\2/output/LayerNorm/scale", _same),
    (_T + _L + r"(attention|crossattention)\.output\.LayerNorm\.bias",
     r"text/layer_\1/\2/output/LayerNorm/bias", _same),
    (_T + _L + r"intermediate\.dense\.weight", r"text/layer_\1/intermediate/kernel", _linear),
    (_T + _L + r"intermediate\.dense\.bias", r"text/layer_\1/intermediate/bias", _same),
    (_T + _L + r"output\.dense\.weight", r"text/layer_\1/output/dense/kernel", _linear),
    (_T + _L + r"output\.dense\.bias", r"text/layer_\1/output/dense/bias", _same),
    (_T + _L + r"output\.LayerNorm\.weight", r"text/layer_\1/output/LayerNorm/scale", _same),
    (_T + _L + r"output\.LayerNorm\.bias", r"text/layer_\1/output/LayerNorm/bias", _same),
    (r"text_encoder\.cls\.predictions\.bias", "text/mlm_bias", _same),
    # Only for a model with an untied decoder (model.mlm_decoder_tied=False, e.g. CCLM's mlm_head);
    # otherwise the key is checked to equal the word embeddings.
    (r"text_encoder\.cls\.predictions\.decoder\.weight", "text/mlm_decoder/kernel", _linear),
    (r"text_encoder\.cls\.predictions\.transform\.dense\.weight", "text/mlm_transform/dense/kernel", _linear),
    (r"text_encoder\.cls\.predictions\.transform\.dense\.bias", "text/mlm_transform/dense/bias", _same),
    (r"text_encoder\.cls\.predictions\.transform\.LayerNorm\.weight", "text/mlm_transform/LayerNorm/scale", _same),
    (r"text_encoder\.cls\.predictions\.transform\.LayerNorm\.bias", "text/mlm_transform/LayerNorm/bias", _same),
    (r"(vision_proj|text_proj)\.weight", r"\1/kernel", _linear),
    (r"(vision_proj|text_proj)\.bias", r"\1/bias", _same),
    (r"(itm_head|bbox_head|cls_head)\.0\.weight", r"\1/dense_0/kernel", _linear),
    (r"(itm_head|bbox_head|cls_head)\.0\.bias", r"\1/dense_0/bias", _same),
    (r"(itm_head|bbox_head|cls_head)\.1\.weight", r"\1/norm/scale", _same),
    (r"(itm_head|bbox_head|cls_head)\.1\.bias", r"\1/norm/bias", _same),
    (r"(itm_head|bbox_head|cls_head)\.3\.weight", r"\1/dense_1/kernel", _linear),
    (r"(itm_head|bbox_head|cls_head)\.3\.bias", r"\1/dense_1/bias", _same),
]

# The answer decoder's keys (converted with the text encoder's table).
_ANSWER_DECODER_KEY = "text_decoder."

# Keys that are checked against what they must equal rather than loaded.
_REL_INDEX = re.compile(_B + r"attn\.relative_position_index")
_POSITION_IDS = re.compile(_T + r"embeddings\.position_ids")
_DECODER_WEIGHT = re.compile(r"text_encoder\.cls\.predictions\.decoder\.weight")
_DECODER_BIAS = re.compile(r"text_encoder\.cls\.predictions\.decoder\.bias")
_WORD_EMBEDDINGS = re.compile(_T + r"embeddings\.word_embeddings\.weight")
_MLM_BIAS = re.compile(r"text_encoder\.cls\.predictions\.bias")
_REL_TABLE_PATH = re.compile(r"vision/blocks_\d+/attn/relative_position_bias_table")


def _task_head_path(path: str, target_shapes: Mapping[str, tuple]) -> str:
  """The reference names every task head `cls_head` (build_mlp(k * H, outputs)); it goes to the
  one task head of the model (`X2VLM.heads`, named by the task), found as the top-level subtree
  with the same MLP layout that is none of the pre-training heads."""
  rest = path[len("cls_head/"):]
  core = {"itm_head", "bbox_head", "vision", "text", "answer_decoder"}
  heads = sorted({p.split("/", 1)[0] for p in target_shapes
                  if p.split("/", 1)[0] not in core and p.endswith(f"/{rest}")})
  return f"{heads[0]}/{rest}" if len(heads) == 1 else path


def is_rel_pos_table(name: str) -> bool:
  """True for a flat param name of a ViT block's relative position bias table."""
  return bool(_REL_TABLE_PATH.fullmatch(name))


# transformers' XLM-R MLM head -> the BERT names of the table.
_LM_HEAD = (("lm_head.dense.", "cls.predictions.transform.dense."),
            ("lm_head.layer_norm.", "cls.predictions.transform.LayerNorm."),
            ("lm_head.decoder.", "cls.predictions.decoder."),
            ("lm_head.bias", "cls.predictions.bias"))
_X2VLM_PREFIXES = ("vision_encoder.", "text_encoder.", "cross_encoder.", _ANSWER_DECODER_KEY)
_HF_TEXT_PREFIXES = ("roberta.", "embeddings.", "encoder.layer.", "lm_head.", "pooler.")
_TEXT_LAYER = re.compile(_T + _L)
_CROSS_LAYER = re.compile(r"cross_encoder\.encoder\.layer\.(\d+)\.(.*)")


def canonical_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rewrites XLM-R text-encoder layouts onto X2-VLM's key names (others pass through unchanged).

  transformers XLMRobertaModel / XLMRobertaForMaskedLM (no X2-VLM prefix anywhere; keys
  `roberta.*` or bare `embeddings.*` / `encoder.*`): -> `text_encoder.*`, MLM head
  `lm_head.{dense,layer_norm,decoder,bias}` -> `text_encoder.cls.predictions.{transform.dense,
  transform.LayerNorm,decoder,bias}`; the pooler is dropped (X2-VLM has none, and the reference
  loads XLM-R weights non-strictly).
  CCLM (`XVLMPlusBase`): `cross_encoder.encoder.layer.k.*` -> `text_encoder.encoder.layer.{T+k}.*`
  with T = the checkpoint's number of text layers; `mlm_head.predictions.*` ->
  `text_encoder.cls.predictions.*` (its decoder is untied: convert into model.mlm_decoder_tied=False).
  """
  keys = list(state)
  if not any(k.startswith(_X2VLM_PREFIXES) for k in keys) and any(
      k.startswith(_HF_TEXT_PREFIXES) for k in keys):
    out = {}
    for key, value in state.items():
      name = key[len("roberta."):] if key.startswith("roberta.") else key
      if name.startswith("pooler."):
        continue
      for old, new in _LM_HEAD:
        if name.startswith(old):
          name = new + name[len(old):]
          break
      out["text_encoder." + name] = value
    return out
  if not any(k.startswith(("cross_encoder.", "mlm_head.")) for k in keys):
    return dict(state)
  text_layers = 1 + max((int(m.group(1)) for m in map(_TEXT_LAYER.match, keys) if m), default=-1)
  out = {}
  for key, value in state.items():
    cross = _CROSS_LAYER.fullmatch(key)
    if cross:
      key = f"text_encoder.encoder.layer.{text_layers + int(cross.group(1))}.{cross.group(2)}"
    elif key.startswith("mlm_head.predictions."):
      key = "text_encoder.cls." + key[len("mlm_head."):]
    out[key] = value
  return out


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """`torch.load` a checkpoint (with or without the 'model' wrapper) -> name -> float numpy array,
  with XLM-R layouts renamed by `canonical_keys`."""
  import torch  # conversion-time dependency only

  if not os.path.isfile(path):
    raise ConversionError(f"checkpoint {path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:  # pylint: disable=broad-except  # whatever torch says of a non-torch file
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                          f"{detail})") from e
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    obj = obj["model"]
  elif isinstance(obj, Mapping) and "module" in obj and isinstance(obj["module"], Mapping):
    obj = obj["module"]
  if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
    raise ConversionError(f"{path}: not a state dict of tensors (found {type(obj).__name__})")
  state = canonical_keys({k: v.detach().cpu().numpy() for k, v in obj.items()})
  if not any(k.startswith(("vision_encoder.", "text_encoder.")) for k in state):
    sample = ", ".join(sorted(state)[:5])
    raise ConversionError(f"{path}: not an X2-VLM checkpoint (nor XLM-R): no 'vision_encoder.*' or "
                          f"'text_encoder.*' keys (first keys: {sample})")
  return state


def _map_name(key: str) -> tuple[str, Callable] | None:
  for pattern, template, transform in NAME_TABLE:
    match = re.fullmatch(pattern, key)
    if match:
      return match.expand(template), transform
  return None


def _geometric_offsets(src_half: int, dst_half: int) -> np.ndarray:
  """Source grid offsets [1, 1+q, 1+q+q^2, ...] with q chosen so they span `dst_half` (BEiT)."""
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    total = (1.0 - q ** src_half) / (1.0 - q)
    if total > dst_half:
      right = q
    else:
      left = q
  q = (left + right) / 2.0
  offsets, cur = [], 1.0
  for i in range(src_half):
    offsets.append(cur)
    cur += q ** (i + 1)
  return np.asarray(offsets)


def resize_rel_pos_table(table: np.ndarray, dst_rows: int) -> np.ndarray:
  """Resize a BEiT relative position bias table [(2Gs-1)^2 + 3, heads] to `dst_rows` rows.

  The (2G-1)^2 offset grid is resampled with an interpolating bicubic spline over a geometric
  progression of source coordinates (the reference's `interpolate_pos_embed`, whose scipy
  `interp2d(kind='cubic')` equals `RectBivariateSpline(kx=ky=3, s=0)`); the 3 cls rows are kept.
  """
  from scipy.interpolate import RectBivariateSpline

  extra = 3
  src = int(round(math.sqrt(table.shape[0] - extra)))
  dst = int(round(math.sqrt(dst_rows - extra)))
  if src * src + extra != table.shape[0] or dst * dst + extra != dst_rows:
    raise ConversionError(f"relative position table rows {table.shape[0]} -> {dst_rows} are not "
                          "of the form (2G-1)^2 + 3")
  if src == dst:
    return table
  offsets = _geometric_offsets(src // 2, dst // 2)
  coords = np.concatenate([-offsets[::-1], [0.0], offsets])
  targets = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
  grid = table[:-extra].astype(np.float64)
  columns = []
  for head in range(table.shape[1]):
    z = grid[:, head].reshape(src, src)  # [dy, dx]
    spline = RectBivariateSpline(coords, coords, z, kx=3, ky=3, s=0)
    columns.append(spline(targets, targets).reshape(-1))
  resized = np.stack(columns, axis=-1).astype(table.dtype)
  return np.concatenate([resized, table[-extra:]], axis=0)


def convert_state_dict(state: Mapping[str, np.ndarray], target_shapes: Mapping[str, tuple],
                       *, allow_missing: tuple[str, ...] = (),
                       source: str = "checkpoint") -> tuple[dict[str, np.ndarray], list[str]]:
  """Map a PyTorch state dict onto the model's flat param names ('/'-joined).

  Args:
    state: torch key -> numpy array.
    target_shapes: flat Flax param path -> expected shape (from `jax.eval_shape` of init).
    allow_missing: fnmatch patterns of Flax paths that may be absent (left to fresh init).
    source: file name for error messages.
  Returns:
    (params: flat path -> array, missing: the allowed-missing paths the caller must initialise).
  Raises:
    ConversionError listing unexpected keys, missing params and shape mismatches.
  """
  state = canonical_keys(state)
  decoder_keys = [k for k in state if k.startswith(_ANSWER_DECODER_KEY)]
  if decoder_keys:
    # The answer decoder (reference `text_decoder.bert.*` / `text_decoder.cls.*`) has the
    # text encoder's layout: convert it as one, onto `answer_decoder/...`.
    as_text = {"text_encoder." + k[len(_ANSWER_DECODER_KEY):]: state[k] for k in decoder_keys}
    decoder_shapes = {"text/" + p[len("answer_decoder/"):]: s
                      for p, s in target_shapes.items() if p.startswith("answer_decoder/")}
    decoder_allowed = tuple("text/" + p[len("answer_decoder/"):] if p.startswith("answer_decoder/")
                            else p for p in allow_missing if not p.startswith("text/"))
    decoder_params, decoder_missing = convert_state_dict(
        as_text, decoder_shapes, allow_missing=decoder_allowed,
        source=f"{source} (text_decoder.*)")
    state = {k: v for k, v in state.items() if not k.startswith(_ANSWER_DECODER_KEY)}
    target_shapes = {p: s for p, s in target_shapes.items() if not p.startswith("answer_decoder/")}
    rest, allowed = convert_state_dict(state, target_shapes, allow_missing=allow_missing,
                                       source=source)
    rest.update({"answer_decoder/" + p[len("text/"):]: v for p, v in decoder_params.items()})
    return rest, allowed + ["answer_decoder/" + p[len("text/"):] for p in decoder_missing]

  params: dict[str, np.ndarray] = {}
  unexpected, mismatched, buffer_errors = [], [], []
  word_embeddings = next((v for k, v in state.items() if _WORD_EMBEDDINGS.fullmatch(k)), None)
  mlm_bias = next((v for k, v in state.items() if _MLM_BIAS.fullmatch(k)), None)

  for key, value in state.items():
    if _REL_INDEX.fullmatch(key):
      continue  # checked below against the model's own index at the checkpoint's resolution
    if _POSITION_IDS.fullmatch(key):
      if not np.array_equal(value.reshape(-1), np.arange(value.size)):
        buffer_errors.append(f"{key}: position_ids is not arange({value.size})")
      continue
    if _DECODER_WEIGHT.fullmatch(key) and "text/mlm_decoder/kernel" not in target_shapes:
      if word_embeddings is None or not np.array_equal(value, word_embeddings):
        buffer_errors.append(f"{key}: MLM decoder weight is not tied to the word embeddings "
                             "(a separate decoder, as CCLM's: model.mlm_decoder_tied=False)")
      continue
    if _DECODER_BIAS.fullmatch(key):
      if mlm_bias is None or not np.array_equal(value, mlm_bias):
        buffer_errors.append(f"{key}: MLM decoder bias differs from cls.predictions.bias")
      continue
    mapped = _map_name(key)
    if mapped is not None and mapped[0].startswith("cls_head/"):
      mapped = (_task_head_path(mapped[0], target_shapes), mapped[1])
    if mapped is None or mapped[0] not in target_shapes:
      unexpected.append(f"{key} {list(value.shape)}"
                        + (f" (would be {mapped[0]})" if mapped else ""))
      continue
    path, transform = mapped
    array = transform(np.asarray(value))
    expected = tuple(target_shapes[path])
    if is_rel_pos_table(path) and array.shape != expected and array.shape[1:] == expected[1:]:
      array = resize_rel_pos_table(array, expected[0])
    if path == "frame_pos_embed" and array.shape != expected and array.shape[1:] == expected[1:]:
      keep = min(array.shape[0], expected[0])  # copy the first frames, as the reference does
      fresh = np.zeros(expected, array.dtype)
      fresh[:keep] = array[:keep]
      array = fresh
    if array.shape != expected:
      mismatched.append(f"{path} (from {key}): expected {list(expected)}, found {list(array.shape)}")
      continue
    params[path] = array

  for key, value in state.items():
    match = _REL_INDEX.fullmatch(key)
    if match:
      grid = int(round(math.sqrt(value.shape[0] - 1)))
      if grid * grid + 1 != value.shape[0] or not np.array_equal(value, relative_position_index(grid)):
        buffer_errors.append(f"{key}: relative_position_index differs from the BEiT layout")

  mismatched_paths = {m.split(" ", 1)[0] for m in mismatched}
  missing = sorted(p for p in target_shapes if p not in params and p not in mismatched_paths)
  allowed = [p for p in missing if any(fnmatch.fnmatchcase(p, pat) for pat in allow_missing)]
  not_allowed = [f"{p} {list(target_shapes[p])}" for p in missing if p not in allowed]
  if not_allowed or unexpected or mismatched or buffer_errors:
    hints = (["Use --allow-missing PATTERN for parameters you intend to train from scratch."]
             if not_allowed else [])
    raise ConversionError(mismatch_report(
        source, missing=not_allowed, unexpected=unexpected, mismatched=mismatched,
        buffer_errors=buffer_errors, implied=implied_model_fields(state),
        configured=implied_model_fields(target_shapes), hints=hints))
  return params, allowed


# ------------------------------------------------------------------------- mismatch reports
_BLOCK_PATH = re.compile(r"vision/blocks_(\d+)/")
_LAYER_PATH = re.compile(r"(text|answer_decoder)/layer_(\d+)/(.*)")
# A layer index inside a Flax path or a torch key (`blocks_3`, `layer_3`, `blocks.3`, `layer.3`).
_INDEX = re.compile(r"(?<=blocks_)\d+|(?<=layer_)\d+|(?<=blocks\.)\d+|(?<=layer\.)\d+")
MAX_REPORT_LINES = 4  # lines per list of a mismatch report before "... and N more"


def _shape(value: Any) -> tuple[int, ...]:
  """An array's shape, or a shape given as a tuple / list of ints."""
  if isinstance(value, (tuple, list)):
    return tuple(int(d) for d in value)
  return tuple(int(d) for d in np.shape(value))


def _placeholder(shape: tuple[int, ...]) -> np.ndarray:
  """A read-only array of `shape` that allocates nothing (every stride 0): for shape arithmetic."""
  return np.broadcast_to(np.int8(0), shape)


def flax_shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """Shapes under the model's flat unrolled names ('vision/blocks_0/attn/qkv/kernel').

  state: a PyTorch state dict (torch names, as `load_torch_state_dict` returns; arrays, tensors or
    shape tuples) or flat params ('/'-joined names, either layer layout; arrays or shape tuples).
  Torch keys the name table does not know are left out; an answer decoder's `text_decoder.*`
  keys land under `answer_decoder/`.
  """
  from x2vlm_jax.models import layer_stack  # pylint: disable=import-outside-toplevel

  shapes = {k: _shape(v) for k, v in state.items()}
  if any("/" in k for k in shapes) or not shapes:
    if layer_stack.is_stacked(shapes):
      unstacked = layer_stack.unstack({k: _placeholder(v) for k, v in shapes.items()})
      shapes = {k: tuple(v.shape) for k, v in unstacked.items()}
    return shapes
  out = {}
  for key, shape in canonical_keys(shapes).items():
    decoder = key.startswith(_ANSWER_DECODER_KEY)
    mapped = _map_name("text_encoder." + key[len(_ANSWER_DECODER_KEY):] if decoder else key)
    if mapped is None or (decoder and not mapped[0].startswith("text/")):
      continue
    path = "answer_decoder/" + mapped[0][len("text/"):] if decoder else mapped[0]
    out[path] = tuple(mapped[1](_placeholder(shape)).shape)
  return out


def implied_model_fields(state: Mapping[str, Any]) -> dict[str, int]:
  """The `config.model` fields a checkpoint's shapes imply (those it holds the tensors for).

  state: see `flax_shapes` (a torch state dict or flat params, arrays or shapes).
  Returns a subset of: patch_size, vision_width, vision_depth, vision_heads (the relative position
  tables' columns), vision_mlp_dim, image_res (from the tables' (2G-1)^2 + 3 rows, G = image_res
  / patch_size, or an absolute position embedding's length), num_frames, vocab_size, text_width,
  max_position, type_vocab_size, text_layers (layers without cross-attention), fusion_layers
  (with it), text_mlp_dim, embed_dim, answer_decoder_layers, mlm_head (a bool). text_heads is not
  stored in any shape.
  """
  shapes = flax_shapes(state)
  fields: dict[str, int] = {}
  patch = shapes.get("vision/patch_embed/kernel")  # [p, p, 3, D]
  if patch:
    fields["patch_size"], fields["vision_width"] = patch[0], patch[-1]
  elif shapes.get("vision/cls_token"):
    fields["vision_width"] = shapes["vision/cls_token"][-1]
  blocks = {int(m.group(1)) for m in map(_BLOCK_PATH.match, shapes) if m}
  if blocks:
    fields["vision_depth"] = max(blocks) + 1
  table = shapes.get("vision/blocks_0/attn/relative_position_bias_table")  # [(2G-1)^2 + 3, H]
  if table:
    fields["vision_heads"] = table[1]
    side = math.isqrt(max(table[0] - 3, 0))
    if side * side + 3 == table[0] and side % 2 == 1 and patch:
      fields["image_res"] = (side + 1) // 2 * patch[0]
  elif shapes.get("vision/pos_embed") and patch:  # [1, 1 + G^2, D]
    grid = math.isqrt(shapes["vision/pos_embed"][1] - 1)
    fields["image_res"] = grid * patch[0]
  if shapes.get("vision/blocks_0/mlp/fc1/kernel"):
    fields["vision_mlp_dim"] = shapes["vision/blocks_0/mlp/fc1/kernel"][1]
  if shapes.get("frame_pos_embed"):  # [F, 1, D]
    fields["num_frames"] = shapes["frame_pos_embed"][0]
  words = shapes.get("text/embeddings/word_embeddings/embedding")  # [V, W]
  if words:
    fields["vocab_size"], fields["text_width"] = words
  for name, field in (("position", "max_position"), ("token_type", "type_vocab_size")):
    if shapes.get(f"text/embeddings/{name}_embeddings/embedding"):
      fields[field] = shapes[f"text/embeddings/{name}_embeddings/embedding"][0]
  cross: dict[str, dict[int, bool]] = {"text": {}, "answer_decoder": {}}
  for m in map(_LAYER_PATH.fullmatch, shapes):
    if m:
      layers = cross[m.group(1)]
      layers[int(m.group(2))] = layers.get(int(m.group(2)), False) or m.group(3).startswith(
          "crossattention/")
  if cross["text"]:
    fields["text_layers"] = sum(not c for c in cross["text"].values())
    fields["fusion_layers"] = sum(cross["text"].values())
  if shapes.get("text/layer_0/intermediate/kernel"):
    fields["text_mlp_dim"] = shapes["text/layer_0/intermediate/kernel"][1]
  proj = shapes.get("text_proj/kernel") or shapes.get("vision_proj/kernel")
  if proj:
    fields["embed_dim"] = proj[1]
  if cross["answer_decoder"]:
    fields["answer_decoder_layers"] = len(cross["answer_decoder"])
  if words:
    fields["mlm_head"] = any(p.startswith("text/mlm_") for p in shapes)
  return fields


def _index_ranges(indices: Iterable[int]) -> str:
  """[0, 1, 2, 5] -> '0-2,5'."""
  runs: list[list[int]] = []
  for i in sorted(set(indices)):
    if runs and i == runs[-1][-1] + 1:
      runs[-1].append(i)
    else:
      runs.append([i])
  return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def group_entries(entries: Sequence[str]) -> list[tuple[str, int]]:
  """Report lines that differ only in one layer index -> one line with the indices as ranges.

  'vision/blocks_0/gamma_1 [64]', 'vision/blocks_1/gamma_1 [64]' -> ('vision/blocks_{0-1}/gamma_1
  [64]', 2). An entry whose layer numbers differ from each other stays alone. Returns (line,
  number of entries it stands for), in the order of each group's first entry.
  """
  groups: dict[str, list[int]] = {}
  for entry in entries:
    found = {int(m) for m in _INDEX.findall(entry)}
    if len(found) == 1:
      groups.setdefault(_INDEX.sub("{}", entry), []).append(found.pop())
    else:
      groups.setdefault(entry.replace("{", "{{").replace("}", "}}"), [])
  lines = []
  for template, indices in groups.items():
    if not indices:
      lines.append((template.replace("{{", "{").replace("}}", "}"), 1))
    else:
      label = str(indices[0]) if len(indices) == 1 else "{" + _index_ranges(indices) + "}"
      lines.append((template.replace("{}", label), len(indices)))
  return lines


def _name_prefix(name: str, depth: int) -> str:
  """The first `depth` components of a Flax path ('/') or a torch key ('.')."""
  sep = "/" if "/" in name else "."
  return sep.join(name.split(sep)[:depth])


def condense(entries: Sequence[str], limit: int) -> list[str]:
  """At most about `limit` lines for `entries` ('name detail...'): layers grouped
  (`group_entries`); if still too many, names collapsed to their deepest common prefix that
  leaves at most `limit` groups ('text/layer_1/crossattention/* (10 params)'); else capped
  with '... and N more'. Every entry is counted in exactly one line."""
  grouped = group_entries(entries)
  if len(grouped) <= limit:
    return [line for line, _ in grouped]
  names = [line.split(" ", 1)[0] for line, _ in grouped]
  deepest = max(len(n.replace(".", "/").split("/")) for n in names)
  for depth in range(deepest - 1, 0, -1):
    buckets: dict[str, list[int]] = {}
    for i, name in enumerate(names):
      buckets.setdefault(_name_prefix(name, depth), []).append(i)
    if len(buckets) <= limit:
      sep = lambda prefix: "/" if "/" in names[buckets[prefix][0]] else "."  # noqa: E731
      return [grouped[idx[0]][0] if len(idx) == 1 else
              f"{prefix}{sep(prefix)}* ({sum(grouped[i][1] for i in idx)} params)"
              for prefix, idx in buckets.items()]
  rest = sum(count for _, count in grouped[limit:])
  return [line for line, _ in grouped[:limit]] + [f"... and {rest} more"]


def _listing(title: str, entries: Sequence[str], *, collapse: bool) -> list[str]:
  """'  title (N):' then the entries' lines: condensed by prefix (`collapse`) or capped."""
  if not entries:
    return []
  if collapse:
    lines = condense(entries, MAX_REPORT_LINES)
  else:
    grouped = group_entries(entries)
    rest = sum(count for _, count in grouped[MAX_REPORT_LINES:])
    lines = ([line for line, _ in grouped[:MAX_REPORT_LINES]]
             + ([f"... and {rest} more"] if rest else []))
  return [f"  {title} ({len(entries)}):"] + [f"    {line}" for line in lines]


def mismatch_report(where: str, *, missing: Sequence[str], unexpected: Sequence[str],
                    mismatched: Sequence[str], implied: Mapping[str, int],
                    configured: Mapping[str, int], buffer_errors: Sequence[str] = (),
                    hints: Sequence[str] = ()) -> str:
  """The report of a checkpoint that does not fit the model, a dozen lines whatever its size.

  Line 1 counts the differences and names the config fields whose value the checkpoint's shapes
  contradict (`implied` vs `configured`, both from `implied_model_fields`; a differing image_res
  is not a problem: tables are interpolated). Then each differing parameter once, in exactly one
  list (missing / unexpected / shape mismatches), layers with the same difference on one line,
  then every field the checkpoint implies and the `hints`.
  Args:
    where: the checkpoint, as the user named it.
    missing, unexpected, mismatched, buffer_errors: one line per parameter (or buffer).
  """
  differing = {k: v for k, v in implied.items() if k in configured and configured[k] != v}
  # Fields an :arg can set (image_res differs harmlessly; the answer decoder comes with a task).
  settable = {k: v for k, v in differing.items() if k not in ("image_res", "answer_decoder_layers")}
  counts = (f"{len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape mismatches"
            + (f", {len(buffer_errors)} failed buffer checks" if buffer_errors else ""))
  conflicts = [f"model.{k}={v} (config: {configured[k]})" for k, v in differing.items()
               if k != "image_res"]
  lines = [f"checkpoint {where} does not match config.model: {counts}"
           + (f"; the checkpoint implies {', '.join(conflicts)}" if conflicts else "")]
  lines += _listing("missing from the checkpoint (model parameter, expected shape)", missing,
                    collapse=True)
  lines += _listing("unexpected in the checkpoint (name, shape)", unexpected, collapse=True)
  lines += _listing("shape mismatches", mismatched, collapse=False)
  lines += _listing("failed buffer checks", buffer_errors, collapse=False)
  if implied:
    described = [f"{k}={v}" + (f" (config: {configured[k]}; tables are interpolated)"
                                if k == "image_res" and k in differing else "")
                 for k, v in implied.items()]
    lines.append("  config.model fields the checkpoint implies: " + ", ".join(described)
                 + " (text_heads is not stored in the weights)")
  if settable:
    overrides = ",".join(f"model.{k}={v}" for k, v in settable.items())
    lines.append(f"  to convert or load it as it is, add to the config's :arg: {overrides}")
  return "\n".join(lines + [f"  {hint}" for hint in hints])


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """Inverse of `unflatten`."""
  flat = {}
  for name, value in tree.items():
    path = f"{prefix}/{name}" if prefix else name
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = value
  return flat


def convert_checkpoint(path: str, model, *, allow_missing: tuple[str, ...] = (), seed: int = 0):
  """Read a released checkpoint and return (nested params for `model`, fresh-initialised names)."""
  return params_for_model(load_torch_state_dict(path), model, allow_missing=allow_missing,
                          seed=seed, source=path)


def params_for_model(state: Mapping[str, np.ndarray], model, *, allow_missing: tuple[str, ...] = (),
                     seed: int = 0, source: str = "checkpoint"):
  """Convert a state dict for `model` (an `X2VLM`) -> (nested numpy params, fresh-init names).

  Parameters matched by `allow_missing` and absent from the state dict come from a fresh
  `model.init` with `seed`. Everything else must match exactly (see `convert_state_dict`).
  Conversion happens in the unrolled layout (`text/layer_3/...`, the names in errors and in
  `allow_missing`); a `scan_layers` model gets the result stacked (`models.layer_stack`).
  """
  import jax
  import flax.linen as nn
  from x2vlm_jax.models import layer_stack
  from x2vlm_jax.models.x2vlm import abstract_variables, init_inputs

  scanned_model, model = model, model.clone(scan_layers=False)
  abstract = flatten(nn.meta.unbox(abstract_variables(model)["params"]))
  shapes = {p: tuple(v.shape) for p, v in abstract.items()}
  params, missing = convert_state_dict(state, shapes, allow_missing=allow_missing, source=source)
  if missing:
    fresh = flatten(nn.meta.unbox(
        model.init(jax.random.PRNGKey(seed), *init_inputs(model))["params"]))
    for p in missing:
      params[p] = np.asarray(fresh[p])
  params = {p: np.asarray(v, dtype=abstract[p].dtype) for p, v in params.items()}
  return unflatten(layer_stack.to_model_layout(params, scanned_model)), missing


def answer_decoder_from_fusion(flat: Mapping[str, np.ndarray], *, text_layers: int,
                               fusion_layers: int, decoder_layers: int) -> dict[str, np.ndarray]:
  """Initial answer-decoder params from a pre-trained text stack (the reference's `text_decoder`).

  Decoder layer k <- text layer `text_layers + k` when the decoder is as deep as the fusion stack,
  or the odd fusion layers `text_layers + 2k + 1` when it is half as deep; the decoder's
  embeddings and LM head <- the text encoder's. Cross-attention weights are copied too (the caller
  drops them when the vision and text widths differ and their shapes do not fit).
  flat: '/'-joined names (`text/...`) -> arrays. Returns `answer_decoder/...` -> arrays.
  """
  if decoder_layers == fusion_layers:
    sources = [text_layers + k for k in range(decoder_layers)]
  elif 2 * decoder_layers == fusion_layers:
    sources = [text_layers + 2 * k + 1 for k in range(decoder_layers)]
  else:
    raise ValueError(f"the answer decoder's {decoder_layers} layers must equal the fusion layers "
                     f"({fusion_layers}) or half of them to initialise from them")
  out = {}
  for name, value in flat.items():
    if not name.startswith("text/"):
      continue
    rest = name[len("text/"):]
    layer = re.fullmatch(r"layer_(\d+)/(.*)", rest)
    if layer is None:
      out[f"answer_decoder/{rest}"] = value  # embeddings, mlm_transform, mlm_bias
    elif int(layer.group(1)) in sources:
      out[f"answer_decoder/layer_{sources.index(int(layer.group(1)))}/{layer.group(2)}"] = value
  return out
