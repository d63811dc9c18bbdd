"""Training (pre-training and fine-tuning): train state, the jitted train step, and the loop.

The train step is a pure function `(state, batches, rng) -> (state, metrics)` where `batches` maps
a batch kind ('image_text', 'regions' for pre-training; 'retrieval', 'grounding' for fine-tuning)
to a batch of global arrays; the kinds present and their loss weights come from the config (the
reference pre-training sums an image-text and a region batch per step).
It is jitted once with explicit shardings over the ('data', 'fsdp', 'tensor') mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from x2vlm_jax import objectives, optim, sharding
from x2vlm_jax.models import x2vlm

jax.config.update("jax_threefry_partitionable", True)

State = dict  # {'step': int32 [], 'params': tree, 'opt_state': tree, 'skipped': int32 []}

OBJECTIVES: dict[str, Callable] = {
    "image_text": objectives.image_text_objective,  # pre-training
    "regions": objectives.region_objective,  # pre-training
    "retrieval": objectives.retrieval_objective,  # fine-tuning (COCO / Flickr30k)
    "grounding": objectives.grounding_objective,  # fine-tuning (RefCOCO)
    "vqa": objectives.vqa_classification_objective,  # fine-tuning (VQA v2 as classification)
    "nlvr": objectives.nlvr_objective,  # fine-tuning (NLVR2)
    "vqa_generative": objectives.vqa_generative_objective,  # fine-tuning (VQA v2, answer decoder)
    "video_text": objectives.video_text_objective,  # pre-training (stage 2)
    "video_retrieval": objectives.video_retrieval_objective,  # fine-tuning (MSR-VTT)
    "video_qa": objectives.video_qa_objective,  # fine-tuning (MSRVTT-QA / MSVD-QA)
    "captioning": objectives.captioning_objective,  # fine-tuning (COCO captioning, MLM generation)
}
# Kinds whose objective has an ITC term (takes `itc_feature_grad_scale`).
_ITC_KINDS = ("image_text", "regions", "retrieval", "video_text", "video_retrieval")


def kind_weights(train_cfg) -> dict[str, float]:
  """Loss weight of each batch kind, from config.train.<kind>_weight (regions: region_weight)."""
  return {"image_text": train_cfg.image_text_weight, "regions": train_cfg.region_weight,
          "retrieval": train_cfg.retrieval_weight, "grounding": train_cfg.grounding_weight,
          "vqa": train_cfg.vqa_weight, "nlvr": train_cfg.nlvr_weight,
          "vqa_generative": train_cfg.vqa_generative_weight,
          "video_text": train_cfg.video_text_weight,
          "video_retrieval": train_cfg.video_retrieval_weight,
          "video_qa": train_cfg.video_qa_weight,
          "captioning": train_cfg.captioning_weight}


def data_kind(kind: str) -> str:
  """The pipeline (`pipeline.make_iterator` kind) of a batch kind: retrieval fine-tuning reads
  image-text batches, video retrieval video-text batches; the others their own."""
  return {"retrieval": "image_text", "video_retrieval": "video_text"}.get(kind, kind)


def data_section(kind: str) -> str:
  """The `config.data` sub-config a batch kind reads (the answer decoder reads data.vqa)."""
  return {"vqa_generative": "vqa"}.get(data_kind(kind), data_kind(kind))


def batch_kinds(train_cfg) -> tuple[str, ...]:
  """The batch kinds that make one optimizer step (those with a non-zero loss weight)."""
  kinds = tuple(k for k, w in kind_weights(train_cfg).items() if w > 0)
  if not kinds:
    raise ValueError("config.train: every *_weight (image_text, region, retrieval, grounding, vqa, "
                     "nlvr, vqa_generative, video_text, video_retrieval, video_qa, captioning) "
                     "is 0")
  return kinds


def make_loss_fn(model: x2vlm.X2VLM, train_cfg) -> Callable:
  """loss_fn(params, batches, rng) -> (total loss, metrics dict). Weighted sum over batch kinds."""
  weights = kind_weights(train_cfg)

  def loss_fn(params, batches: Mapping[str, Mapping[str, jax.Array]], rng: jax.Array):
    total = 0.0
    metrics = {}
    for i, kind in enumerate(sorted(batches)):
      itm_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, i))
      kwargs = dict(deterministic=False)
      if kind in _ITC_KINDS:
        kwargs["itc_feature_grad_scale"] = train_cfg.itc_feature_grad_scale
      if kind == "regions":
        kwargs["dedupe_padded_pairs"] = train_cfg.dedupe_padded_pairs
      if kind == "captioning":
        kwargs["label_smoothing"] = train_cfg.caption_label_smoothing
      out = model.apply({"params": params}, batches[kind], itm_rng, method=OBJECTIVES[kind],
                        rngs={"dropout": dropout_rng}, **kwargs)
      loss_weights = train_cfg.loss_weights
      kind_loss = sum(loss_weights[name] * value for name, value in out.items())
      total = total + weights[kind] * kind_loss
      metrics.update({f"{kind}/{name}": value for name, value in out.items()})
      metrics[f"{kind}/loss"] = kind_loss
    metrics["loss"] = total
    return total, metrics

  return loss_fn


def make_train_step(model: x2vlm.X2VLM, tx: optax.GradientTransformation, train_cfg,
                    schedule: Callable | None = None) -> Callable:
  """The pure train step. Non-finite losses or gradients skip the update (counted in state)."""
  loss_fn = make_loss_fn(model, train_cfg)

  def train_step(state: State, batches, rng):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batches, rng)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
      updates, new_opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      # The reference clamps the temperature in place before every step.
      return dict(new_params, temp=jnp.clip(new_params["temp"], 0.001, 0.5)), new_opt_state

    # A conditional, not a select: the skipped branch costs nothing when the step is finite.
    new_params, new_opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o),
                                             state["params"], state["opt_state"])
    new_state = dict(step=state["step"] + 1, params=new_params, opt_state=new_opt_state,
                     skipped=state["skipped"] + (1 - finite.astype(jnp.int32)))
    metrics = dict(metrics, grad_norm=grad_norm, temp=new_params["temp"],
                   nonfinite=1 - finite.astype(jnp.int32))
    if schedule is not None:
      metrics["lr"] = schedule(state["step"])
    return new_state, metrics

  return train_step


@dataclasses.dataclass
class Trainer:
  """Everything built from a config on a mesh: model, optimizer, shardings, jitted functions."""
  config: Any
  mesh: jax.sharding.Mesh
  model: x2vlm.X2VLM
  tx: optax.GradientTransformation
  schedule: Callable
  rules: tuple
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  kinds: tuple[str, ...]

  @classmethod
  def create(cls, config, mesh: jax.sharding.Mesh | None = None) -> "Trainer":
    mesh = mesh or sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    model = x2vlm.build_model(config.model)
    boxed = x2vlm.abstract_variables(model)["params"]
    tx, schedule = optim.make_optimizer(config.optim, boxed, total_steps=config.train.total_steps)
    boxed_state = jax.eval_shape(lambda p: dict(step=jnp.zeros((), jnp.int32), params=p,
                                                opt_state=tx.init(p),
                                                skipped=jnp.zeros((), jnp.int32)), boxed)
    abstract_state = sharding.abstract_with_shardings(boxed_state, mesh, rules)
    return cls(config, mesh, model, tx, schedule, rules, abstract_state,
               batch_kinds(config.train))

  @property
  def state_shardings(self):
    return sharding.tree_shardings(self.abstract_state)

  def init_state(self, seed: int, params: Any | None = None) -> State:
    """Fresh state (random init with `seed`, or the given numpy/jax params), placed sharded."""
    model, tx = self.model, self.tx

    def init(rng, given):
      p = given if given is not None else nn.meta.unbox(
          model.init(rng, *x2vlm.init_inputs(model))["params"])
      return dict(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                  skipped=jnp.zeros((), jnp.int32))

    if params is not None:
      params = jax.device_put(params, self.state_shardings["params"])
    with self.mesh, nn.logical_axis_rules(self.rules):
      return jax.jit(init, out_shardings=self.state_shardings)(jax.random.PRNGKey(seed), params)

  @functools.cached_property
  def train_step(self) -> Callable:
    """Jitted step: (state, batches, rng) -> (state, metrics); the state buffer is donated."""
    step = make_train_step(self.model, self.tx, self.config.train, self.schedule)
    batch_sh = sharding.batch_sharding(self.mesh)
    repl = sharding.replicated(self.mesh)
    jitted = jax.jit(step, in_shardings=(self.state_shardings, batch_sh, repl),
                     out_shardings=(self.state_shardings, repl), donate_argnums=(0,))

    def run(state, batches, rng):
      with self.mesh, nn.logical_axis_rules(self.rules):
        return jitted(state, batches, rng)

    return run

  def global_batches(self, local_batches: Mapping[str, Mapping[str, np.ndarray]]):
    """Per-process numpy batches -> global sharded arrays (batch statistics removed; region
    batches' image and pair indices offset to be unique across processes)."""
    from x2vlm_jax.data import pipeline

    process = jax.process_index()
    return {kind: sharding.make_global_batch(pipeline.to_global_indices(
        {k: v for k, v in batch.items() if k not in STAT_KEYS}, process), self.mesh)
        for kind, batch in local_batches.items()}


STAT_KEYS = ("num_bad_records", "num_records")


# ---------------------------------------------------------------------------------------- loop
def make_data_iterators(config, kinds: tuple[str, ...]) -> dict[str, Any]:
  """One grain iterator per batch kind, sharded by process."""
  from x2vlm_jax.data import pipeline  # the training step itself needs no data code

  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  common = dict(image_res=config.model.image_res, patch_size=config.model.patch_size,
                seed=config.data.seed, **shard)
  return {kind: pipeline.make_iterator(data_kind(kind), config.data, **common) for kind in kinds}


class BadRecordBudget:
  """Sums the per-batch bad/seen record counts and aborts when the bad fraction is too high."""

  def __init__(self, max_fraction: float, min_records: int):
    self.max_fraction, self.min_records = max_fraction, min_records
    self.bad, self.seen = 0, 0

  def add(self, local_batches: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    for batch in local_batches.values():
      self.bad += int(batch.get("num_bad_records", 0))
      self.seen += int(batch.get("num_records", 0))
    if self.seen >= self.min_records and self.bad > self.max_fraction * self.seen:
      from x2vlm_jax.data.pipeline import BadDataError
      raise BadDataError(f"{self.bad} of {self.seen} records were bad (more than "
                         f"{self.max_fraction:.1%}, config.data.max_bad_fraction); the warnings "
                         "above name each file and line")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def check_vocab(config) -> None:
  """The tokenizer's vocabulary must fit the model's embedding table, and its padding id be the
  model's when positions are counted from it (XLM-R) (fails before compiling)."""
  from x2vlm_jax.data import text as text_lib

  tokenizer = text_lib.load_tokenizer(config.data.vocab_path)
  vocab = tokenizer.vocab_size
  if vocab > config.model.vocab_size:
    raise ValueError(f"{config.data.vocab_path} has {vocab} tokens but config.model.vocab_size "
                     f"is {config.model.vocab_size}")
  if config.model.text_position_ids == "roberta" and tokenizer.pad_id != config.model.text_pad_id:
    raise ValueError(f"{config.data.vocab_path} pads with id {tokenizer.pad_id} but "
                     f"config.model.text_pad_id is {config.model.text_pad_id} (roberta positions)")


def _check_answer_head(model_cfg, task: str, path: str, answers) -> None:
  """The classification head (`model.vqa_num_answers`) must exist and have one logit per answer
  of the list read from `path`."""
  if model_cfg.vqa_num_answers <= 0:
    raise ValueError(f"{task} training or evaluation needs config.model.vqa_num_answers > 0")
  if len(answers) != model_cfg.vqa_num_answers:
    raise ValueError(f"{path} lists {len(answers)} answers but config.model.vqa_num_answers is "
                     f"{model_cfg.vqa_num_answers}")


def check_task_heads(config) -> None:
  """VQA / NLVR2 batches and evaluations need their heads, sized to the answer list (fails before
  compiling)."""
  from x2vlm_jax.data import examples as examples_lib

  m, t, e = config.model, config.train, config.eval
  if t.vqa_generative_weight > 0 and m.vqa_decoder_layers <= 0:
    raise ValueError("train.vqa_generative_weight > 0 needs the answer decoder: "
                     "config.model.vqa_decoder_layers > 0")
  classifies = t.vqa_weight > 0 or (e.vqa_files and m.vqa_decoder_layers <= 0)
  if e.vqa_files and m.vqa_decoder_layers > 0:
    examples_lib.load_answer_list(config.data.vqa.answer_list)  # ranked by the decoder
  if classifies:
    _check_answer_head(m, "VQA", config.data.vqa.answer_list,
                       examples_lib.load_answer_list(config.data.vqa.answer_list))
  if (t.nlvr_weight > 0 or e.nlvr_files) and not m.nlvr_head:
    raise ValueError("NLVR2 training or evaluation needs config.model.nlvr_head = True")
  check_video(config)
  check_captioning(config)


def check_captioning(config) -> None:
  """Captioning trains and decodes with the MLM head, and its sequences must fit the position
  table: training max_tokens + max_masks, decoding [CLS] + prompt + caption_max_length (fails
  before compiling)."""
  m, t, e = config.model, config.train, config.eval
  if not (t.captioning_weight > 0 or e.caption_files):
    return
  if not m.mlm_head:
    raise ValueError("captioning training or evaluation needs config.model.mlm_head = True")
  c = config.data.captioning
  if t.captioning_weight > 0 and c.max_tokens + c.max_masks > m.max_position:
    raise ValueError(f"config.data.captioning: max_tokens {c.max_tokens} + max_masks "
                     f"{c.max_masks} exceed config.model.max_position {m.max_position}")
  if e.caption_files:
    from x2vlm_jax.data import captioning as captioning_data
    from x2vlm_jax.data import text as text_lib

    prompt = captioning_data.prompt_ids(text_lib.load_tokenizer(config.data.vocab_path), c.prompt)
    if len(prompt) + e.caption_max_length > m.max_position:
      raise ValueError(f"config.eval.caption_max_length {e.caption_max_length} + the "
                       f"{len(prompt)} tokens of [CLS] {c.prompt!r} exceed "
                       f"config.model.max_position {m.max_position}")


def check_video(config) -> None:
  """Video QA needs the classification head sized to its answer list, and no video batch or
  evaluation may have more frames than the model has frame embeddings (fails before compiling)."""
  from x2vlm_jax.data import video_examples

  m, t, e = config.model, config.train, config.eval
  uses = {"video_text": t.video_text_weight > 0 or t.video_retrieval_weight > 0
                        or bool(e.video_retrieval_file),
          "video_qa": t.video_qa_weight > 0 or bool(e.video_qa_files)}
  if uses["video_qa"]:
    _check_answer_head(m, "video QA", config.data.video_qa.answer_list,
                       video_examples.load_answer_labels(config.data.video_qa.answer_list))
  for section, used in uses.items():
    frames = config.data[section].num_frames
    if used and m.num_frames > 0 and frames > m.num_frames:
      raise ValueError(f"config.data.{section}.num_frames is {frames} but the model has "
                       f"{m.num_frames} frame embeddings (config.model.num_frames)")


def restore_or_init(trainer: Trainer, checkpointer, iterators, config) -> State:
  """Resume from the latest checkpoint in the workdir, else start from `config.init.checkpoint`
  (an Orbax params directory, e.g. from tools/convert_checkpoint.py), else from scratch."""
  from x2vlm_jax import checkpoint

  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info("Resuming from step %d (%s)", latest, checkpointer.directory)
    return checkpointer.restore(latest, trainer.abstract_state, iterators)
  params = None
  if config.init.checkpoint:
    params = load_init_params(trainer, config.init.checkpoint, tuple(config.init.allow_missing),
                              config.train.seed, tuple(config.init.ignore_unexpected))
  return trainer.init_state(config.train.seed, params)


def load_init_params(trainer: Trainer, directory: str, allow_missing: tuple[str, ...], seed: int,
                     ignore_unexpected: tuple[str, ...] = (), *, with_step: bool = False):
  """Params from an Orbax params dir or a training workdir, checked against the model before
  anything compiles (with `with_step`: (params, the checkpoint's step, 0 for a params dir)).

  A generative-VQA answer decoder absent from the checkpoint starts as the text stack's fusion
  layers (`convert.answer_decoder_from_fusion`, as the reference). Names matched by
  `allow_missing` (fnmatch) may be absent and start fresh; stored names matched by
  `ignore_unexpected` are dropped (e.g. the MLM head when fine-tuning). Relative-position tables
  stored for another image_res are interpolated to this model's, as the reference does when
  fine-tuning at 384 from a 224 checkpoint; a frame embedding stored for another number of
  frames keeps its first frames. Anything else that differs fails with the full list.
  The checkpoint may have either layer layout (`model.scan_layers`): all of the above happens in
  the unrolled one (the names in messages and patterns), and the result has the model's.
  """
  import fnmatch
  from x2vlm_jax import checkpoint, convert
  from x2vlm_jax.models import layer_stack

  def matches(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)

  stored, step = checkpoint.load_any_params(directory)
  stored = layer_stack.unstack(convert.flatten(stored))
  m = trainer.model.clone(scan_layers=False)  # the names below are the unrolled layout's
  target = convert.flatten(nn.meta.unbox(x2vlm.abstract_variables(m)["params"])
                           if trainer.model.scan_layers else trainer.abstract_state["params"])
  if (m.vqa_decoder_layers > 0 and not any(p.startswith("answer_decoder/") for p in stored)):
    decoder = convert.answer_decoder_from_fusion(
        stored, text_layers=m.text_layers, fusion_layers=m.fusion_layers,
        decoder_layers=m.vqa_decoder_layers)
    decoder = {p: v for p, v in decoder.items()
               if p in target and tuple(v.shape) == tuple(target[p].shape)}
    stored.update(decoder)
    logging.info("Answer decoder initialised from the text stack's fusion layers, embeddings and "
                 "MLM head (%d arrays)", len(decoder))
  dropped = [p for p in stored if p not in target and matches(p, ignore_unexpected)]
  for p in dropped:
    del stored[p]
  for p in target:
    if (p in stored and convert.is_rel_pos_table(p)
        and tuple(stored[p].shape) != tuple(target[p].shape)):
      stored[p] = convert.resize_rel_pos_table(np.asarray(stored[p]), target[p].shape[0])
  frames = stored.get("frame_pos_embed")
  if (frames is not None and "frame_pos_embed" in target
      and tuple(frames.shape[1:]) == tuple(target["frame_pos_embed"].shape[1:])
      and frames.shape[0] != target["frame_pos_embed"].shape[0]):
    # Another number of frames: the first ones are copied (reference), the rest start at 0 (as
    # convert.py does for a PyTorch checkpoint).
    keep = min(frames.shape[0], target["frame_pos_embed"].shape[0])
    resized = np.zeros(target["frame_pos_embed"].shape, np.asarray(frames).dtype)
    resized[:keep] = np.asarray(frames)[:keep]
    stored["frame_pos_embed"] = resized
  missing = [p for p in target if p not in stored]
  not_allowed = [p for p in missing if not matches(p, allow_missing)]
  unexpected = [p for p in stored if p not in target]
  mismatched = [f"{p}: expected {list(target[p].shape)}, found {list(stored[p].shape)}"
                for p in target if p in stored and tuple(stored[p].shape) != tuple(target[p].shape)]
  if not_allowed or unexpected or mismatched:
    raise ValueError(f"init checkpoint {directory} does not match config.model:\n"
                     f"  missing: {not_allowed}\n  unexpected: {unexpected}\n"
                     f"  shape mismatches: {mismatched}\n"
                     "(config.init.allow_missing lists patterns that may start fresh, "
                     "config.init.ignore_unexpected patterns that may be dropped)")
  if dropped:
    logging.info("Dropped %d stored params the model does not use: %s", len(dropped), dropped)
  if missing:
    fresh = convert.flatten(jax.device_get(nn.meta.unbox(m.init(
        jax.random.PRNGKey(seed), *x2vlm.init_inputs(m))["params"])))
    stored.update({p: fresh[p] for p in missing})
    logging.info("Fresh init for %d params absent from %s: %s", len(missing), directory, missing)
  params = convert.unflatten(layer_stack.to_model_layout(
      {p: np.asarray(v, target[p].dtype) for p, v in stored.items()}, trainer.model))
  return (params, step) if with_step else params


class NonFiniteError(RuntimeError):
  """Too many optimizer steps in a row had a non-finite loss or gradient."""


class Preemption:
  """Turns SIGTERM into "checkpoint and stop at the next step boundary".

  One process: a SIGTERM handler (installed for the `with` block, the previous one restored after)
  sets a flag. Several processes: JAX's preemption sync point, so that every process stops at the
  same step (JAX's notifier listens for the same signal); if the distributed runtime has no
  preemption service, the local flag is used.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._sync_point = jax.process_count() > 1

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _on_signal(self, signum, frame) -> None:
    del frame
    logging.warning("Received signal %d: saving a checkpoint at the end of this step", signum)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self._sync_point:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step)) or self.requested
      except RuntimeError as e:  # no preemption service in this distributed runtime
        logging.warning("JAX preemption sync point unavailable (%s); using SIGTERM only", e)
        self._sync_point = False
    return self.requested


class NonFiniteMonitor:
  """Counts steps in a row whose update was skipped for a non-finite loss or gradient.

  Reads each step's `nonfinite` flag one step late, so that checking never stalls the device
  queue. With `halt_after` > 0, `check` raises NonFiniteError after that many in a row, having
  written the last offending batch to `workdir/nonfinite_batch_step{N}.npz`.
  """

  def __init__(self, halt_after: int, workdir: str):
    self.halt_after, self.workdir = int(halt_after), workdir
    self.in_a_row = 0
    self._pending = None  # (step, nonfinite flag [] on device, local batches)

  def push(self, step: int, nonfinite: jax.Array, local_batches) -> None:
    """Records step `step`'s flag; checks the previous step's."""
    previous, self._pending = self._pending, (step, nonfinite, local_batches)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      previous, self._pending = self._pending, None
      self._check(*previous)

  def _check(self, step: int, nonfinite: jax.Array, local_batches) -> None:
    if not int(jax.device_get(nonfinite)):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    logging.warning("Step %d: non-finite loss or gradient, update skipped (%d in a row)", step,
                    self.in_a_row)
    if self.halt_after and self.in_a_row >= self.halt_after:
      path = os.path.join(self.workdir, f"nonfinite_batch_step{step}.npz")
      if jax.process_index() == 0:
        np.savez(path, **{f"{kind}/{k}": np.asarray(v) for kind, batch in local_batches.items()
                          for k, v in batch.items()})
      raise NonFiniteError(
          f"{self.in_a_row} steps in a row up to step {step} had a non-finite loss or gradient "
          f"(config.train.halt_after_nonfinite_steps={self.halt_after}); the last batch is in "
          f"{path}, the parameters of the last finite step are checkpointed in {self.workdir}")


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Pre-train with `config` in `workdir` (resuming if it holds checkpoints); evaluate at the end
  (and every `config.train.eval_every_steps` steps when that is > 0).

  Returns the final evaluation metrics (empty if no evaluation is configured or the run stopped
  early because of `config.train.max_steps_per_run`).
  """
  from x2vlm_jax import checkpoint, metrics as metrics_lib, sharding as sharding_lib
  from x2vlm_jax.evaluate import from_config

  tcfg = config.train
  trainer = Trainer.create(config)
  is_chief = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, is_chief=is_chief)
  writer.write_hparams(config.to_dict())
  logging.info("Model: %s parameters", f"{x2vlm.count_params(trainer.abstract_state['params']):,}")
  logging.info("%s", sharding_lib.describe_memory(trainer.abstract_state["params"],
                                                  trainer.abstract_state["opt_state"],
                                                  trainer.mesh))
  check_vocab(config)
  check_task_heads(config)
  iterators = make_data_iterators(config, trainer.kinds)
  checkpointer = checkpoint.Checkpointer(
      f"{workdir}/checkpoints", keep=tcfg.keep_checkpoints, every_steps=tcfg.checkpoint_every_steps,
      async_save=tcfg.async_checkpoints)
  state = restore_or_init(trainer, checkpointer, iterators, config)
  start = int(jax.device_get(state["step"]))
  examples_per_step = sum(config.data[data_section(k)].batch_size
                          for k in trainer.kinds) * jax.process_count()
  reporter = metrics_lib.ProgressReporter(tcfg.total_steps, examples_per_step,
                                          tcfg.log_every_steps, start_step=start)
  budget = BadRecordBudget(config.data.max_bad_fraction, config.data.min_records_before_abort)
  base_rng = jax.random.PRNGKey(tcfg.seed)
  nonfinite = NonFiniteMonitor(tcfg.halt_after_nonfinite_steps, workdir)

  def stop_early(step: int, why: str) -> dict:
    checkpointer.save(step, state, iterators, force=True)
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    logging.info("Stopped at step %d (%s); checkpoint saved. Rerun the same command to resume.",
                 step, why)
    return {}

  step = start
  with Preemption() as preemption:
    while step < tcfg.total_steps:
      local = {kind: next(it) for kind, it in iterators.items()}
      budget.add(local)
      state, step_metrics = trainer.train_step(state, trainer.global_batches(local),
                                               jax.random.fold_in(base_rng, step))
      step += 1
      try:
        nonfinite.push(step, step_metrics["nonfinite"], local)
        if step == tcfg.total_steps:
          nonfinite.flush()
      except NonFiniteError:
        stop_early(step, "non-finite steps")
        raise
      if step % tcfg.log_every_steps == 0 or step == tcfg.total_steps:
        scalars = _scalars(step_metrics)
        scalars.update({"data/bad_records": budget.bad, "data/records": budget.seen,
                        "skipped_updates": int(jax.device_get(state["skipped"]))})
        writer.write_scalars(step, scalars)
        reporter(step, scalars)
      if step < tcfg.total_steps and preemption.should_stop(step):
        return stop_early(step, "preempted")
      with reporter.paused():
        checkpointer.save(step, state, iterators, force=step == tcfg.total_steps)
        if (tcfg.eval_every_steps and step % tcfg.eval_every_steps == 0
            and step < tcfg.total_steps):  # the last step's evaluation follows the loop
          results = from_config.run(config, trainer.model, state["params"], predictions_dir=None)
          if results:
            writer.write_scalars(step, results)
      if (tcfg.max_steps_per_run and step - start >= tcfg.max_steps_per_run
          and step < tcfg.total_steps):
        return stop_early(step, "config.train.max_steps_per_run")
  checkpointer.wait()
  checkpointer.close()
  results = from_config.run(config, trainer.model, state["params"],
                            predictions_dir=workdir if is_chief else None)
  if results:
    writer.write_scalars(step, results)
  writer.close()
  return results
