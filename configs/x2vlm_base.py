"""X2-VLM-base: BEiT-2 ViT-B/16 + BERT-base (12 text + 6 fusion layers), 254,758,401 parameters.

Pre-training (4M-image recipe of the reference, configs/pretrain/x2vlm_base_4m.yaml):
  python main.py --config configs/x2vlm_base.py --workdir runs/base \
      --config.data.image_text.files='["/data/cc3m/*.jsonl"]' --config.data.regions.files=...
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, file="configs/x2vlm_base.py")
  config = common.base_config()
  config.model.image_res = 224
  common.set_model_size(config.model, "base")
  config.optim.lr = 1e-4
  # 4M recipe: 101 "epochs" of 5,114,489 pairs at 1024 per step ~= 504,495 steps, warm-up 2500.
  config.train.total_steps = 504_495
  return common.finish(config, arg)
