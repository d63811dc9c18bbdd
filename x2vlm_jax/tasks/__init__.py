"""The task registry: every pre-training and fine-tuning task, one module each.

  pre-training   image_text, regions, video_text
  fine-tuning    retrieval, grounding, vqa (classification head), vqa_generative (answer
                 decoder), nlvr2, captioning, video_retrieval, video_qa

A config selects tasks by name: `config.train.tasks = {"image_text": 1.0, "regions": 1.0}` (name
-> loss weight; a step sums one batch of each, weighted) and evaluators by type:
`config.evals.<name> = tasks.evaluator_config("retrieval", file=..., k_test=256)`. Each task's data
section is `config.data.<name>`. To add a task, write `x2vlm_jax/tasks/<name>.py` with a
`base.Task` subclass and `TASK = ...`, and add it to `_BUILTIN` below (or call `register` from
your own code before building the config).
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from x2vlm_jax.tasks import base
from x2vlm_jax.tasks import captioning
from x2vlm_jax.tasks import grounding
from x2vlm_jax.tasks import image_text
from x2vlm_jax.tasks import nlvr2
from x2vlm_jax.tasks import ovad
from x2vlm_jax.tasks import regions
from x2vlm_jax.tasks import retrieval
from x2vlm_jax.tasks import video_qa
from x2vlm_jax.tasks import video_retrieval
from x2vlm_jax.tasks import video_text
from x2vlm_jax.tasks import vqa
from x2vlm_jax.tasks import vqa_generative
from x2vlm_jax.tasks import winoground
from x2vlm_jax.tasks import zeroshot

Task = base.Task

_BUILTIN = (
    # pre-training
    image_text.TASK,
    regions.TASK,
    video_text.TASK,
    # fine-tuning
    retrieval.TASK,
    grounding.TASK,
    vqa.TASK,
    vqa_generative.TASK,
    nlvr2.TASK,
    captioning.TASK,
    video_retrieval.TASK,
    video_qa.TASK,
    # evaluation only
    ovad.TASK,
    winoground.TASK,
    zeroshot.TASK,
)
_TASKS: dict[str, base.Task] = {}


def register(task: base.Task) -> base.Task:
  """Adds `task` to the registry (its name and evaluator types must be new)."""
  if not task.name or task.name in _TASKS:
    raise ValueError(f"task name {task.name!r} is empty or already registered")
  taken = set(evaluator_types())
  for type_name in task.evaluators:
    if type_name in taken:
      raise ValueError(f"task {task.name!r}: evaluator type {type_name!r} is already registered")
  _TASKS[task.name] = task
  return task


def unregister(name: str) -> None:
  """Removes a task added with `register` (tests)."""
  _TASKS.pop(name)


def names() -> tuple[str, ...]:
  return tuple(_TASKS)


def get(name: str) -> base.Task:
  """The task called `name` (a KeyError listing the registered names if there is none)."""
  if name not in _TASKS:
    raise KeyError(f"no task {name!r}; registered tasks: {', '.join(_TASKS)}")
  return _TASKS[name]


# ---------------------------------------------------------------------------------- config
def data_sections() -> dict[str, ml_collections.ConfigDict]:
  """{task name: its default data section} (`config.data.<name>`)."""
  return {name: task.config() for name, task in _TASKS.items()}


def loss_terms() -> tuple[str, ...]:
  """Every loss term any task reports (the keys of `config.train.loss_weights`), in order."""
  terms: list[str] = []
  for task in _TASKS.values():
    terms += [t for t in task.loss_terms if t not in terms]
  return tuple(terms)


def training_tasks(config) -> dict[str, base.Task]:
  """{name: task} of `config.train.tasks` entries with a weight > 0, sorted by name (the order
  of a step's forward passes and of their random streams)."""
  weights = config.train.tasks
  for name, weight in weights.items():
    get(name)
    if weight < 0:
      raise ValueError(f"config.train.tasks.{name} = {weight}: a loss weight must be >= 0")
  chosen = {name: get(name) for name in sorted(weights) if weights[name] > 0}
  if not chosen:
    raise ValueError(f"config.train.tasks {dict(weights)} has no task with a weight > 0 "
                     f"(tasks: {', '.join(_TASKS)})")
  return chosen


def evaluator_types() -> dict[str, type]:
  """{evaluator type: its class}, over every task."""
  return {type_name: cls for task in _TASKS.values() for type_name, cls in task.evaluators.items()}


def _evaluator_task(type_name: str) -> base.Task:
  for task in _TASKS.values():
    if type_name in task.evaluators:
      return task
  raise KeyError(f"no evaluator type {type_name!r}; types: {', '.join(evaluator_types())}")


def evaluator_config(type_name: str, **fields: Any) -> ml_collections.ConfigDict:
  """A `config.evals.<name>` entry: the type's defaults with `fields` set (an unknown field fails
  naming the type's fields)."""
  cfg = _evaluator_task(type_name).evaluators[type_name].default_config()
  unknown = sorted(set(fields) - set(cfg))
  if unknown:
    raise KeyError(f"evaluator type {type_name!r} has no field {unknown}; fields: "
                   f"{', '.join(cfg)}")
  cfg.update(fields)
  return cfg


def used_tasks(config) -> dict[str, base.Task]:
  """The tasks a config uses: those it trains (weight > 0) and those of its evaluators."""
  used = {name: get(name) for name, weight in config.train.tasks.items() if weight > 0}
  for entry in config.evals.values():
    task = _evaluator_task(entry.type)
    used.setdefault(task.name, task)
  return used


def model_changes(config) -> dict[str, Any]:
  """The X2VLM arguments the used tasks add: their `heads` (one per name; two tasks may share a
  head only with the same shape) and `answer_decoder_layers`."""
  heads: dict[str, tuple] = {}
  changes: dict[str, Any] = {}
  owner: dict[str, str] = {}
  for name, task in used_tasks(config).items():
    for key, value in task.model_changes(config).items():
      if key == "heads":
        for head in value:
          if head[0] in heads and tuple(heads[head[0]]) != tuple(head):
            raise ValueError(f"tasks {owner[head[0]]} and {name} both add head {head[0]!r}, with "
                             f"different shapes ({heads[head[0]]} vs {head})")
          heads[head[0]], owner[head[0]] = head, name
      elif key in changes and changes[key] != value:
        raise ValueError(f"tasks {owner[key]} and {name} set model {key} to {changes[key]} and "
                         f"{value}")
      else:
        changes[key], owner[key] = value, name
  return dict(changes, heads=tuple(heads.values()))


def build_model(config):
  """The `X2VLM` of `config.model` with what the config's tasks add."""
  from x2vlm_jax.models import x2vlm

  return x2vlm.build_model(config.model, **model_changes(config))


def new_param_patterns(config) -> tuple[str, ...]:
  """`config.optim.new_param_patterns` plus the parameters the trained tasks add."""
  patterns = list(config.optim.new_param_patterns)
  for task in training_tasks(config).values():
    patterns += [p for p in task.new_params if p not in patterns]
  return tuple(patterns)


def allow_missing(config) -> tuple[str, ...]:
  """`config.init.allow_missing` plus the parameters the trained tasks add (fresh when absent)."""
  patterns = list(config.init.allow_missing)
  for task in training_tasks(config).values():
    patterns += [p for p in task.allow_missing if p not in patterns]
  return tuple(patterns)


# ---------------------------------------------------------------------------------- checks
def check_tokenizer(config) -> None:
  """The tokenizer's vocabulary must fit the model's embedding table, and its padding id be the
  model's when positions are counted from it (XLM-R)."""
  from x2vlm_jax import errors, saved_config
  from x2vlm_jax.data import text as text_lib

  vocab_path = config.data.vocab_path
  if not vocab_path:
    raise errors.InputError("config.data.vocab_path is empty: name the tokenizer's vocab.txt "
                            "(BERT) or sentencepiece model (XLM-R)")
  try:
    tokenizer = text_lib.load_tokenizer(saved_config.tokenizer_file(vocab_path))
  except FileNotFoundError as e:
    raise errors.InputError(str(e)) from e
  if tokenizer.vocab_size > config.model.vocab_size:
    raise errors.InputError(f"{vocab_path} has {tokenizer.vocab_size} tokens but "
                            f"config.model.vocab_size is {config.model.vocab_size}")
  if config.model.text_position_ids == "roberta" and tokenizer.pad_id != config.model.text_pad_id:
    raise errors.InputError(f"{vocab_path} pads with id {tokenizer.pad_id} but "
                            f"config.model.text_pad_id is {config.model.text_pad_id} (roberta "
                            "positions)")


def validate(config, *, training: bool) -> None:
  """Every check that can fail before anything compiles: the task names and weights, each
  trained task's own checks, the evaluator types and the tokenizer (the evaluators check their
  files when they are built)."""
  from x2vlm_jax import errors

  try:
    check_tokenizer(config)
    if training:
      for task in training_tasks(config).values():
        task.validate(config)
    for name, entry in config.evals.items():
      if "type" not in entry:
        raise ValueError(f"config.evals.{name} has no 'type' (one of "
                         f"{', '.join(evaluator_types())})")
      _evaluator_task(entry.type)
    model_changes(config)
  except ValueError as e:  # each check names the field: a config mistake, not a bug
    if isinstance(e, errors.InputError):
      raise
    raise errors.InputError(str(e)) from e


def make_evaluators(config, model, mesh=None) -> dict[str, Any]:
  """{name: evaluator} for every entry of `config.evals`, built once (files read and checked:
  a file that matches nothing, an empty split or a bad record fails here, before anything
  compiles, with the entry's name in front of the reason)."""
  from x2vlm_jax.data import records

  evaluators = {}
  for name, entry in config.evals.items():
    try:
      evaluators[name] = evaluator_types()[entry.type](name, entry, config=config, model=model,
                                                       mesh=mesh)
    except (ValueError, FileNotFoundError, records.BadDataError) as e:
      if str(e).startswith(f"config.evals.{name}"):
        raise
      raise type(e)(f"config.evals.{name} ({entry.type}): {e}") from e
  return evaluators


def forward_flops(config) -> dict[str, dict[str, int]]:
  """{task: its forward FLOPs per component} for the trained tasks (x2vlm_jax/flops.py)."""
  return {name: task.forward_flops(config) for name, task in training_tasks(config).items()}


def train_step_flops(config) -> int:
  """FLOPs of one optimizer step: 3 x the forward FLOPs of every trained task's batch."""
  return 3 * sum(sum(parts.values()) for parts in forward_flops(config).values())


def weights(config) -> Mapping[str, float]:
  """{name: loss weight} of the trained tasks."""
  return {name: float(config.train.tasks[name]) for name in training_tasks(config)}


for _task in _BUILTIN:
  register(_task)
