"""Flickr30K image-text retrieval fine-tuning and evaluation (Karpathy split), X2-VLM base or large.

The reference released no X2-VLM retrieval config; these are X-VLM's Flickr30K values
(REFERENCE_DETAILED.md §4.1): image_res 384, 20 pairs per GPU on 8 GPUs (global batch 160),
lr 3e-5, weight decay 0.01, 10 epochs with 10% warm-up, max_tokens 40, k_test 128.
145,000 training pairs / 160 = 907 steps per epoch -> 9,070 steps.

  # a pre-training checkpoint converted at 224 px (its tables are interpolated to 384 on load):
  x2vlm convert --release x2vlm_base_4m --from x2vlm_base_4m.th \
      --vocab bert-base-uncased/vocab.txt --output ckpt/x2vlm_base_4m
  python main.py --config configs/finetune/flickr_retrieval.py --workdir runs/flickr_ret \
      --config.init.checkpoint=ckpt/x2vlm_base_4m \
      --config.data.retrieval.image_root=/data/flickr30k \
      --config.evals.retrieval.image_root=/data/flickr30k
  python main.py --mode eval --config configs/finetune/flickr_retrieval.py \
      --checkpoint runs/flickr_ret --workdir runs/flickr_ret_eval --config.data.vocab_path=...

Records: train `{"image": relpath, "caption": str, "image_id": ...}`, test
`{"image": relpath, "caption": [str, ...]}` (JSON lists as the reference ships them, or JSONL).
arg: `large` selects X2-VLM-large; `field=value` overrides.
"""
from configs import common
from configs.finetune import coco_retrieval


def get_config(arg=None):
  # The COCO recipe; Flickr30K data, length and k_test.
  config, arg = coco_retrieval.recipe(arg, file="configs/finetune/flickr_retrieval.py")
  config.data.retrieval.files = ["data/finetune/flickr30k_train.json"]
  config.data.retrieval.image_root = "data/flickr30k"
  config.train.total_steps = 9_070
  config.train.checkpoint_every_steps = 907  # once per epoch
  e = config.evals.retrieval
  e.file = "data/finetune/flickr30k_test.json"
  e.image_root = "data/flickr30k"
  e.k_test = 128
  return common.finish(config, arg)
