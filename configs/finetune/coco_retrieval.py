"""COCO image-text retrieval fine-tuning and evaluation (Karpathy split), X2-VLM base or large.

The reference released no X2-VLM retrieval config; these are X-VLM's COCO values
(REFERENCE_DETAILED.md §4.1): image_res 384, 20 pairs per GPU on 8 GPUs (global batch 160),
lr 3e-5, weight decay 0.01, 10 epochs with 10% warm-up, max_tokens 40, k_test 256.
566,747 training pairs / 160 = 3,542 steps per epoch -> 35,420 steps.

  # a pre-training checkpoint converted at 224 px (its tables are interpolated to 384 on load):
  x2vlm convert --release x2vlm_base_4m --from x2vlm_base_4m.th \
      --vocab bert-base-uncased/vocab.txt --output ckpt/x2vlm_base_4m
  python main.py --config configs/finetune/coco_retrieval.py --workdir runs/coco_ret \
      --config.init.checkpoint=ckpt/x2vlm_base_4m \
      --config.data.retrieval.image_root=/data/coco --config.evals.retrieval.image_root=/data/coco
  python main.py --mode eval --config configs/finetune/coco_retrieval.py \
      --checkpoint runs/coco_ret --workdir runs/coco_ret_eval

Records: train `{"image": relpath, "caption": str, "image_id": ...}`, test
`{"image": relpath, "caption": [str, ...]}` (JSON lists as the reference ships them, or JSONL).
arg: `large` selects X2-VLM-large; `field=value` overrides (`coco_retrieval.py:large,train.seed=1`).
"""
from configs import common


def recipe(arg=None, *, file: str = "configs/finetune/coco_retrieval.py"):
  """The COCO recipe, unlocked, and the parsed arg (Flickr30K changes the data and length)."""
  arg = common.parse_arg(arg, flags=tuple(common.MODEL_SIZES), file=file)
  config = common.finetune_config(common.size_of(arg), image_res=384, task="retrieval")
  d = config.data
  d.max_tokens = d.max_words = 40
  r = d.retrieval
  r.files = ["data/finetune/coco_train.json"]
  r.image_root = "data/coco"
  r.batch_size = 160  # per host: one host with 8 GPUs = the reference's 8 x 20
  r.crop_scale_min = 0.5  # RandomResizedCrop(384, scale=(0.5, 1.0))
  r.randaug = True
  t = config.train
  t.total_steps = 35_420
  t.log_every_steps = 100
  t.checkpoint_every_steps = 3_542  # once per epoch
  config.optim.lr = 3e-5
  config.evals.retrieval = common.evaluator(
      "retrieval", file="data/finetune/coco_test.json", image_root="data/coco", k_test=256,
      batch_size=64)
  return config, arg


def get_config(arg=None):
  config, arg = recipe(arg)
  return common.finish(config, arg)
