"""VQA (classification) and NLVR2 fine-tuning on the synthetic demo scenes, from the CLI, on a CPU.

  python main.py --config configs/demo.py --workdir runs/demo              # pre-train first
  python main.py --config configs/finetune/demo_tasks.py:vqa --workdir runs/demo_vqa \
      --config.init.checkpoint=runs/demo
  python main.py --config configs/finetune/demo_tasks.py:nlvr --workdir runs/demo_nlvr \
      --config.init.checkpoint=runs/demo

The model is configs/demo.py's; the data (x2vlm_jax/data/demo.py, made if missing) holds
questions about each scene ("what colour is the circle", "is there a blue square") and
statements about pairs of scenes ("the left image has a red circle"). Evaluation on the
validation scenes writes eval/vqa/val_vqa/acc or eval/nlvr/val_nlvr/acc to metrics.jsonl.
arg: `vqa` or `nlvr`, plus optional `quick` (a smoke run) and `data_dir=PATH`.
"""
from configs import demo


def get_config(arg=None):
  options = [item for item in (arg or "").split(",") if item]
  tasks = [o for o in options if o in ("vqa", "nlvr")]
  if len(tasks) != 1:
    raise ValueError(f"configs/finetune/demo_tasks.py: arg must name one task, vqa or nlvr "
                     f"(got {arg!r})")
  task = tasks[0]
  config = demo.get_config(",".join(o for o in options if o != task))
  config.unlock()
  data_dir = config.demo.data_dir
  config.model.mlm_head = False
  config.init.ignore_unexpected = ["text/mlm_*"]
  t = config.train
  t.image_text_weight = t.region_weight = 0.0
  quick = "quick" in options
  t.total_steps = 6 if quick else 300
  config.optim.total_steps = t.total_steps
  config.optim.lr = 5e-4
  config.optim.lr_mult = 2.0
  e = config.eval
  e.retrieval_file = ""
  e.grounding_files = []
  if task == "vqa":
    config.model.vqa_num_answers = 11  # colours, shapes, yes, no (demo answer_list.json)
    v = config.data.vqa
    v.files = [f"{data_dir}/train_vqa.jsonl"]
    v.image_root = data_dir
    v.answer_list = f"{data_dir}/answer_list.json"
    v.batch_size = 8 if quick else 32
    v.randaug = False
    t.vqa_weight = 1.0
    config.init.allow_missing = ["vqa_head/*"]
    config.optim.new_param_patterns = [r"^vqa_head/"]
    e.vqa_files = [f"{data_dir}/val_vqa.jsonl"]
    e.vqa_image_root = data_dir
  else:
    config.model.nlvr_head = True
    n = config.data.nlvr
    n.files = [f"{data_dir}/train_nlvr.jsonl"]
    n.image_root = data_dir
    n.batch_size = 8 if quick else 32
    n.randaug = False
    n.hflip_prob = 0.0  # the statements name colours and shapes only; keep the scenes as drawn
    t.nlvr_weight = 1.0
    config.init.allow_missing = ["nlvr_cls/*"]
    config.optim.new_param_patterns = [r"^nlvr_cls/"]
    e.nlvr_files = [f"{data_dir}/val_nlvr.jsonl"]
    e.nlvr_image_root = data_dir
  config.lock()
  return config
