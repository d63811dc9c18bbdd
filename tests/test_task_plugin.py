"""Adding a task is one new file plus one registry line: a tiny task written here as a module of
its own (data section, record processing, a head it adds, its objective and its evaluator), then
`tasks.register(module.TASK)`, trains from `train.train_and_evaluate` and is evaluated."""
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from configs import common
from x2vlm_jax import tasks, train

# The whole task: what a user would put in x2vlm_jax/tasks/colour.py.
TASK_FILE = '''
"""Which of three colours fills the image: classification from the image fused with a prompt.

Records {"image": path, "label": 0 | 1 | 2}. Batch: image [B, R, R, 3], label [B]. A head
`colour_head` (3 logits) on the fused [CLS] of the prompt "colour"; cross-entropy. Evaluator type
"colour": accuracy as eval/<name>/acc.
"""
import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import losses, objectives
from x2vlm_jax.data import config as data_config
from x2vlm_jax.data import eval_data, examples, pipeline
from x2vlm_jax.evaluate import common
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import base

PROMPT_IDS = np.array([2, 5, 3, 0], np.int32)  # [CLS] colour [SEP] [PAD]


def logits(m, image, deterministic=True):
  ids = jnp.broadcast_to(PROMPT_IDS, (image.shape[0], 4))
  fused = objectives.fuse_text_with(m, m.encode_image(image, deterministic), ids,
                                    (ids > 0).astype(jnp.int32), deterministic)
  return m.head_logits("colour_head", fused)


class Processor(examples.Processor):
  def process(self, where, rec, rng):
    image = self._augment(self._image(rec), rng, (1.0, 1.0), flipped=False)
    return {"image": image, "label": np.int32(rec["label"])}


class Evaluator(common.Evaluator):
  TYPE = "colour"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.file, cfg.image_root = "", ""
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    recs = eval_data.read_split(cfg.file, "images")
    where = [w for w, _ in recs]
    self.images = eval_data.EvalImages([eval_data.image_path(r, w, cfg.image_root)
                                        for w, r in recs], where, config.model.image_res)
    self.labels = np.array([r["label"] for _, r in recs])
    self.fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=logits))

  def run(self, params, step=0, *, predictions_dir=None):
    params = common.place_params(params, self.mesh)
    out = common.run_batched(lambda x: self.fn(params, x), (self.images,), self.batch_size,
                             self.mesh)
    accuracy = float(np.mean(np.argmax(np.asarray(out), 1) == self.labels))
    return {self.metric_name("acc"): 100.0 * accuracy}


class ColourTask(base.Task):
  name = "colour"
  loss_terms = ("colour",)
  new_params = (r"^colour_head/",)
  allow_missing = ("colour_head/*",)
  evaluators = {"colour": Evaluator}

  def config(self):
    return data_config.image_section(randaug=False, hflip_prob=0.0)

  def model_changes(self, config):
    return {"heads": (x2vlm.TaskHead("colour_head", 3, 1),)}

  def processor(self, config, tokenizer):
    return Processor(config.data, self.section(config), config.model.image_res,
                     config.model.patch_size, encoder=None)

  def collate(self, config):
    return lambda examples_, rng=None: pipeline.stack_fields(
        examples_, {"image": np.float32, "label": np.int32})

  def loss(self, m, batch, rng, *, deterministic, config):
    del rng
    return {"colour": losses.classification_loss(logits(m, batch["image"], deterministic),
                                                 batch["label"])}


TASK = ColourTask()
'''

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


@pytest.fixture()
def colour_task(tmp_path):
  path = tmp_path / "colour.py"
  path.write_text(TASK_FILE)
  spec = importlib.util.spec_from_file_location("colour_task_plugin", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tasks.register(module.TASK)  # the registry line
  yield module
  tasks.unregister("colour")


def _write_data(root, n):
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    label = i % 3
    pixels = np.clip(np.array(COLOURS[label]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(root / f"{i}.png")
    rows.append({"image": f"{i}.png", "label": label})
  (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                             "colour"]) + "\n")
  with open(root / "records.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def test_a_task_in_one_file_trains_and_evaluates(colour_task, tmp_path):
  _write_data(tmp_path, 24)
  config = common.base_config()  # built after registering: it holds the task's data section
  assert "colour" in config.data and "colour" in config.train.loss_weights
  m = config.model
  m.image_res, m.patch_size, m.vocab_size, m.max_position = 32, 16, 8, 8
  m.vision_width, m.vision_depth, m.vision_heads, m.vision_mlp_dim = 32, 1, 2, 64
  m.text_width, m.text_heads, m.text_mlp_dim, m.text_layers, m.fusion_layers = 32, 2, 64, 1, 1
  m.embed_dim = 8
  m.hidden_dropout = m.attention_dropout = m.drop_path_rate = 0.0
  config.data.vocab_path = str(tmp_path / "vocab.txt")
  config.data.read_threads = 1
  section = config.data.colour
  section.files, section.image_root, section.batch_size = [str(tmp_path / "records.jsonl")], \
      str(tmp_path), 16  # split over the 8 test devices
  config.train.tasks = {"colour": 1.0}
  config.train.total_steps, config.train.log_every_steps = 60, 20
  config.optim.lr, config.optim.warmup_steps = 2e-3, 2.0
  config.evals.val = common.evaluator("colour", file=str(tmp_path / "records.jsonl"),
                                      image_root=str(tmp_path), batch_size=8)
  config.lock()

  model = tasks.build_model(config)
  assert [h.name for h in model.heads] == ["colour_head"]
  assert tasks.new_param_patterns(config)[-1] == r"^colour_head/"

  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  losses = [r["colour/colour"] for r in rows if "colour/colour" in r]
  assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], losses
  assert results["eval/val/acc"] == 100.0  # three solid colours, learned
