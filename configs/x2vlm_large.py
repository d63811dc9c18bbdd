"""X2-VLM-large: BEiT-2 ViT-L/16 + BERT-large-sized text (12 text + 6 fusion layers), 592,949,057
parameters (reference configs/pretrain/x2vlm_large_4m.yaml: lr 5e-5)."""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, file="configs/x2vlm_large.py")
  config = common.base_config()
  config.model.image_res = 224
  common.set_model_size(config.model, "large")
  config.optim.lr = 5e-5
  # 4M recipe: 101 "epochs" of 5,114,489 pairs at 1024 per step ~= 504,495 steps, warm-up 2500.
  config.train.total_steps = 504_495
  return common.finish(config, arg)
