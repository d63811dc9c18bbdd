"""COCO image-text retrieval fine-tuning and evaluation (Karpathy split), X2-VLM base or large.

The reference released no X2-VLM retrieval config; these are X-VLM's COCO values
(REFERENCE_DETAILED.md §4.1): image_res 384, 20 pairs per GPU on 8 GPUs (global batch 160),
lr 3e-5, weight decay 0.01, 10 epochs with 10% warm-up, max_tokens 40, k_test 256.
566,747 training pairs / 160 = 3,542 steps per epoch -> 35,420 steps.

  # a pre-training checkpoint converted at 224 px (its tables are interpolated to 384 on load):
  python tools/convert_checkpoint.py --checkpoint x2vlm_base_4m.th \
      --config configs/x2vlm_base.py --output ckpt/x2vlm_base_4m
  python main.py --config configs/finetune/coco_retrieval.py --workdir runs/coco_ret \
      --config.init.checkpoint=ckpt/x2vlm_base_4m --config.data.vocab_path=bert/vocab.txt \
      --config.data.image_text.image_root=/data/coco --config.eval.retrieval_image_root=/data/coco
  python main.py --mode eval --config configs/finetune/coco_retrieval.py \
      --checkpoint runs/coco_ret --workdir runs/coco_ret_eval --config.data.vocab_path=...

Records: train `{"image": relpath, "caption": str, "image_id": ...}`, test
`{"image": relpath, "caption": [str, ...]}` (JSON lists as the reference ships them, or JSONL).
`:large` selects X2-VLM-large.
"""
from configs import common


def get_config(arg=None):
  config = common.finetune_config(common.size_arg(arg), image_res=384)
  d = config.data
  d.max_tokens = d.max_words = 40
  d.image_text.files = ["data/finetune/coco_train.json"]
  d.image_text.image_root = "data/coco"
  d.image_text.batch_size = 160  # per host: one host with 8 GPUs = the reference's 8 x 20
  d.image_text.crop_scale_min = 0.5  # RandomResizedCrop(384, scale=(0.5, 1.0))
  d.image_text.randaug = True
  t = config.train
  t.retrieval_weight = 1.0
  t.total_steps = 35_420
  t.log_every_steps = 100
  t.checkpoint_every_steps = 3_542  # once per epoch
  config.optim.lr = 3e-5
  config.optim.total_steps = t.total_steps
  e = config.eval
  e.retrieval_file = "data/finetune/coco_test.json"
  e.retrieval_image_root = "data/coco"
  e.k_test = 256
  e.batch_size = 64
  return common.apply_arg(config, None)
