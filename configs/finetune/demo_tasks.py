"""VQA (classification or the generative answer decoder), NLVR2 and captioning fine-tuning on the
synthetic demo scenes, from the CLI, on a CPU.

  python main.py --config configs/demo.py --workdir runs/demo              # pre-train first
  python main.py --config configs/finetune/demo_tasks.py:vqa --workdir runs/demo_vqa \
      --config.init.checkpoint=runs/demo
  python main.py --config configs/finetune/demo_tasks.py:nlvr2 --workdir runs/demo_nlvr2 \
      --config.init.checkpoint=runs/demo
  python main.py --config configs/finetune/demo_tasks.py:vqa_generative --workdir runs/demo_vqag \
      --config.init.checkpoint=runs/demo
  python main.py --config configs/finetune/demo_tasks.py:captioning --workdir runs/demo_caption \
      --config.init.checkpoint=runs/demo

The model is configs/demo.py's; the data (x2vlm_jax/data/demo.py, made if missing) holds
questions about each scene ("what colour is the circle", "is there a blue square") and
statements about pairs of scenes ("the left image has a red circle"); `captioning` trains the MLM
head to caption the scenes ("a red circle left of a blue square", COCO-style MLM generation) and
decodes the validation scenes with beam search against their references (val_retrieval.jsonl).
Evaluation on the validation scenes writes eval/<task>/<split>/... to metrics.jsonl
(eval/vqa/val_vqa/acc, eval/nlvr2/val_nlvr/acc, eval/captioning/val_retrieval/{bleu_4,cider}).
arg: the task (`vqa`, `vqa_generative`, `nlvr2` or `captioning`), plus optional `quick` (a smoke
run), `data_dir=PATH` and `field=value` overrides.
"""
from configs import common
from configs import demo

TASKS = ("vqa", "vqa_generative", "nlvr2", "captioning")


def get_config(arg=None):
  arg = common.parse_arg(arg, flags=TASKS + ("quick",), options={"data_dir": "demo_data"},
                         file="configs/finetune/demo_tasks.py")
  chosen = sorted(arg.flags & set(TASKS))
  if len(chosen) != 1:
    raise ValueError(f"configs/finetune/demo_tasks.py: the arg must name one task of {TASKS}")
  task = chosen[0]
  quick = "quick" in arg.flags
  data_dir = arg.options["data_dir"] or "demo_data"
  config = demo.get_config(f"no_eval,data_dir={data_dir}" + (",quick" if quick else ""))
  config.unlock()
  config.model.mlm_head = False
  config.init.ignore_unexpected = ["text/mlm_*"]
  t = config.train
  t.tasks = {task: 1.0}
  t.total_steps = 6 if quick else 300
  config.optim.lr = 5e-4
  config.optim.lr_mult = 2.0
  config.optim.new_param_patterns = []  # the task's new head trains at lr x lr_mult
  batch_size = 8 if quick else 32
  eval_batch_size = 16 if quick else 64
  d = config.data
  if task == "vqa":
    v = d.vqa
    v.files = [f"{data_dir}/train_vqa.jsonl"]
    v.image_root = data_dir
    v.answer_list = f"{data_dir}/answer_list.json"
    v.num_answers = 11  # colours, shapes, yes, no (demo answer_list.json)
    v.batch_size = batch_size
    v.randaug = False
    config.evals.vqa = common.evaluator("vqa", files=(f"{data_dir}/val_vqa.jsonl",),
                                        image_root=data_dir, batch_size=eval_batch_size)
  elif task == "vqa_generative":
    # The answer decoder (as deep as the fusion stack) starts as the fusion layers and generates
    # the answers; evaluation ranks answer_list.json with it.
    v = d.vqa_generative
    v.files = [f"{data_dir}/train_vqa.jsonl"]
    v.image_root = data_dir
    v.answer_list = f"{data_dir}/answer_list.json"
    v.batch_size = batch_size
    v.max_answers, v.answer_max_tokens = 2, 4
    v.randaug = False
    config.evals.vqa_generative = common.evaluator(
        "vqa_generative", files=(f"{data_dir}/val_vqa.jsonl",), image_root=data_dir, k_test=8,
        batch_size=eval_batch_size)
    # The same questions answered free-form (greedy decoding, no answer list).
    config.evals.vqa_free = common.evaluator(
        "vqa_generative", files=(f"{data_dir}/val_vqa.jsonl",), image_root=data_dir,
        mode="generate", max_answer_tokens=3, batch_size=eval_batch_size)
  elif task == "captioning":
    # The pre-trained MLM head learns to generate (configs/finetune/coco_captioning.py's recipe,
    # shrunk): "[CLS] a picture of" + a scene caption of <= 11 tokens + [SEP] fits 16 tokens.
    config.model.mlm_head = True
    config.init.ignore_unexpected = []
    c = d.captioning
    c.files = [f"{data_dir}/train_image_text.jsonl"]
    c.image_root = data_dir
    c.max_tokens, c.max_masks = 16, 8  # sequences of 24 <= model.max_position 32
    c.batch_size = batch_size
    c.crop_scale_min = 0.8  # the scenes are small: keep most of each image
    c.randaug = False
    config.optim.new_param_patterns = [r"^vision/"]  # the reference: vision lr = 2 x text lr
    config.evals.captioning = common.evaluator(
        "captioning", files=(f"{data_dir}/val_retrieval.jsonl",), image_root=data_dir,
        max_length=16, min_length=5, beams=3,  # [CLS] a picture of + 16 <= 32 positions
        batch_size=eval_batch_size)
  else:
    n = d.nlvr2
    n.files = [f"{data_dir}/train_nlvr.jsonl"]
    n.image_root = data_dir
    n.batch_size = batch_size
    n.randaug = False
    n.hflip_prob = 0.0  # the statements name colours and shapes only; keep the scenes as drawn
    config.evals.nlvr2 = common.evaluator("nlvr2", files=(f"{data_dir}/val_nlvr.jsonl",),
                                          image_root=data_dir, batch_size=eval_batch_size)
  return common.finish(config, arg)
