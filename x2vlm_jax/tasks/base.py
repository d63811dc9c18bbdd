"""What a task is: everything particular to one pre-training or fine-tuning objective, in one file.

A task module (x2vlm_jax/tasks/<name>.py) defines a `Task` subclass and one instance of it,
`TASK`, listed in `tasks/__init__.py`. The trainer, the pipeline and the CLI only call these
methods; they never branch on a task's name.

  name                 registry key; `config.train.tasks[name]` is its loss weight, its data
                       section is `config.data.<name>`, its losses are logged as `<name>/<term>`
  config()             the default data section (files, batch size, augmentation, options)
  validate(config)     checks before anything compiles (raise naming the config field)
  model_changes(config)  what it adds to the model: `heads` (`X2VLM.TaskHead`s), or
                       `answer_decoder_layers`
  new_params, allow_missing   regexes (lr x lr_mult) / fnmatch patterns (may be absent from the
                       init checkpoint) of the parameters it adds
  processor / collate / examples_per_batch   record -> example -> batch (data/ shared ops)
  loss(m, batch, rng, ...)    the objective, on the bound model; {term: scalar}
  loss_terms           the keys `loss` returns (each has a `config.train.loss_weights` entry)
  evaluators           {evaluator type: `evaluate.common.Evaluator` subclass} it brings
  model_files          fields of its data section naming files a checkpoint must carry
  texts_per_batch, forward_flops, synthetic_batch   examples/s, FLOPs and benchmark batches
  to_global(batch, process_index)   batch-local indices made unique across processes
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import jax
import ml_collections
import numpy as np

from x2vlm_jax.data import pipeline
from x2vlm_jax.data import text as text_lib


class Task:
  """Base class (see the module docstring); subclasses set the class attributes and override."""

  name: ClassVar[str] = ""
  loss_terms: ClassVar[tuple[str, ...]] = ()
  new_params: ClassVar[tuple[str, ...]] = ()
  allow_missing: ClassVar[tuple[str, ...]] = ()
  evaluators: ClassVar[Mapping[str, type]] = {}
  # Fields of `config.data.<name>` naming files that are part of a trained model (an answer list:
  # the head's outputs are its entries); every checkpoint keeps a copy (saved_config.py).
  model_files: ClassVar[tuple[str, ...]] = ()

  # ----------------------------------------------------------------------------- config
  def config(self) -> ml_collections.ConfigDict:
    """The default `config.data.<name>` section."""
    raise NotImplementedError

  def section(self, config) -> ml_collections.ConfigDict:
    return config.data[self.name]

  def field(self, key: str) -> str:
    """`config.data.<name>.<key>`, for messages."""
    return f"config.data.{self.name}.{key}"

  def validate(self, config) -> None:
    """Checks of a config that trains this task (before anything compiles); the default asks for
    training files."""
    if not self.section(config).files:
      raise ValueError(f"{self.field('files')} is empty: list the training files of task "
                       f"{self.name!r} (or drop it from config.train.tasks)")

  def model_changes(self, config) -> dict[str, Any]:
    """X2VLM constructor arguments this task needs: `heads` (a tuple of `TaskHead`s) and/or
    `answer_decoder_layers`. Default: nothing."""
    del config
    return {}

  # ----------------------------------------------------------------------------- data
  def processor(self, config, tokenizer: text_lib.Tokenizer) -> Callable:
    """raw record, rng -> example (or `examples.BadExample`)."""
    raise NotImplementedError

  def collate(self, config) -> Callable:
    """(examples, rng) -> batch of numpy arrays."""
    raise NotImplementedError

  def examples_per_batch(self, config) -> int:
    """Good records per batch (the pipeline's unit)."""
    return int(self.section(config).batch_size)

  def texts_per_batch(self, config) -> int:
    """Examples per batch as the progress line counts them (texts / rows of the losses)."""
    return int(self.section(config).batch_size)

  def make_iterator(self, config, *, seed: int, shard_index: int = 0, shard_count: int = 1,
                    tokenizer: text_lib.Tokenizer | None = None):
    """The infinite, checkpointable batch iterator of this task over its training files."""
    tokenizer = tokenizer or text_lib.load_tokenizer(config.data.vocab_path)
    return pipeline.make_iterator(
        self.processor(config, tokenizer), self.collate(config),
        files=list(self.section(config).files), examples_per_batch=self.examples_per_batch(config),
        cfg=config.data, seed=seed, shard_index=shard_index, shard_count=shard_count,
        what=self.field("files"))

  def to_global(self, batch: dict, process_index: int) -> dict:
    """A process's batch with its batch-local indices made unique in the global batch (the global
    batch concatenates the processes' batches). Default: nothing to change."""
    del process_index
    return batch

  # ----------------------------------------------------------------------------- objective
  def loss(self, m, batch: Mapping[str, jax.Array], rng: jax.Array, *, deterministic: bool,
           config) -> dict[str, jax.Array]:
    """The objective on the bound model `m` (call through `model.apply(..., method=...)`)."""
    raise NotImplementedError

  # ----------------------------------------------------------------------------- benchmarks
  def forward_flops(self, config) -> dict[str, int]:
    """Forward FLOPs of one batch of this task, per component (x2vlm_jax/flops.py)."""
    raise NotImplementedError(f"task {self.name!r} has no FLOP count")

  def synthetic_batch(self, config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random batch shaped exactly like the pipeline's (benchmarks without data)."""
    raise NotImplementedError(f"task {self.name!r} has no synthetic batch")
