"""VQA (classification or the generative answer decoder), NLVR2 and captioning fine-tuning on the
synthetic demo scenes, from the CLI, on a CPU.

  python main.py --config configs/demo.py --workdir runs/demo              # pre-train first
  python main.py --config configs/finetune/demo_tasks.py:vqa --workdir runs/demo_vqa \
      --config.init.checkpoint=runs/demo
  python main.py --config configs/finetune/demo_tasks.py:nlvr --workdir runs/demo_nlvr \
      --config.init.checkpoint=runs/demo
  python main.py --config configs/finetune/demo_tasks.py:vqa_generative --workdir runs/demo_vqag \
      --config.init.checkpoint=runs/demo
  python main.py --config configs/finetune/demo_tasks.py:caption --workdir runs/demo_caption \
      --config.init.checkpoint=runs/demo

The model is configs/demo.py's; the data (x2vlm_jax/data/demo.py, made if missing) holds
questions about each scene ("what colour is the circle", "is there a blue square") and
statements about pairs of scenes ("the left image has a red circle"); `caption` trains the MLM
head to caption the scenes ("a red circle left of a blue square", COCO-style MLM generation) and
decodes the validation scenes with beam search against their references (val_retrieval.jsonl).
Evaluation on the validation scenes writes eval/vqa/val_vqa/acc, eval/nlvr/val_nlvr/acc or
eval/caption/val_retrieval/{bleu_4,cider} to metrics.jsonl.
arg: `vqa`, `vqa_generative` (the answer decoder), `nlvr` or `caption`, plus optional `quick`
(a smoke run) and `data_dir=PATH`.
"""
from configs import demo


def get_config(arg=None):
  options = [item for item in (arg or "").split(",") if item]
  tasks = [o for o in options if o in ("vqa", "nlvr", "vqa_generative", "caption")]
  if len(tasks) != 1:
    raise ValueError(f"configs/finetune/demo_tasks.py: arg must name one task, vqa, "
                     f"vqa_generative, nlvr or caption (got {arg!r})")
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
  elif task == "vqa_generative":
    # The answer decoder (as deep as the fusion stack) starts as the fusion layers and generates
    # the answers; evaluation ranks answer_list.json with it.
    config.model.vqa_decoder_layers = config.model.fusion_layers
    v = config.data.vqa
    v.files = [f"{data_dir}/train_vqa.jsonl"]
    v.image_root = data_dir
    v.answer_list = f"{data_dir}/answer_list.json"
    v.batch_size = 8 if quick else 32
    v.max_answers, v.answer_max_tokens = 2, 4
    v.randaug = False
    t.vqa_generative_weight = 1.0
    config.optim.new_param_patterns = [r"^answer_decoder/"]
    e.vqa_files = [f"{data_dir}/val_vqa.jsonl"]
    e.vqa_image_root = data_dir
    e.vqa_k_test = 8
  elif task == "caption":
    # The pre-trained MLM head learns to generate (configs/finetune/coco_captioning.py's recipe,
    # shrunk): "[CLS] a picture of" + a scene caption of <= 11 tokens + [SEP] fits 16 tokens.
    config.model.mlm_head = True
    config.init.ignore_unexpected = []
    c = config.data.captioning
    c.files = [f"{data_dir}/train_image_text.jsonl"]
    c.image_root = data_dir
    c.max_tokens, c.max_masks = 16, 8  # sequences of 24 <= model.max_position 32
    c.batch_size = 8 if quick else 32
    c.crop_scale_min = 0.8  # the scenes are small: keep most of each image
    c.randaug = False
    t.captioning_weight = 1.0
    config.optim.new_param_patterns = [r"^vision/"]  # the reference: vision lr = 2 x text lr
    e.caption_files = [f"{data_dir}/val_retrieval.jsonl"]
    e.caption_image_root = data_dir
    e.caption_max_length = 16  # [CLS] a picture of + 16 <= 32 positions
    e.caption_min_length = 5
    e.caption_beams = 3
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
