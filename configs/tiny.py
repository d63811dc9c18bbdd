"""A tiny X2-VLM for tests and CI (seconds per compile on a CPU).

Widths are divisible by 4 and head/FFN/vocab sizes by 2, so every mesh of 8 devices
((8,1,1), (2,4,1), (2,2,2)) shards it. arg: `field=value` overrides.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, file="configs/tiny.py")
  config = common.base_config()
  m = config.model
  m.image_res, m.patch_size = 32, 16
  m.vision_width, m.vision_depth, m.vision_heads, m.vision_mlp_dim = 32, 2, 2, 64
  m.text_width, m.text_heads, m.text_mlp_dim = 32, 2, 64
  m.text_layers, m.fusion_layers, m.vocab_size, m.max_position = 1, 1, 64, 16
  m.embed_dim = 8
  d = config.data
  d.max_tokens, d.max_words, d.max_masks = 12, 12, 3
  d.image_text.batch_size = 8
  d.regions.max_images, d.regions.batch_size = 8, 8
  t = config.train
  t.total_steps, t.log_every_steps, t.checkpoint_every_steps = 4, 1, 2
  config.optim.warmup_steps = 1.0
  return common.finish(config, arg)
