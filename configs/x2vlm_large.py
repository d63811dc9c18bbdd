"""X2-VLM-large: BEiT-2 ViT-L/16 + BERT-large-sized text (12 text + 6 fusion layers), 592,949,057
parameters (reference configs/pretrain/x2vlm_large_4m.yaml: lr 5e-5)."""
from configs import common


def get_config(arg=None):
  config = common.base_config()
  m = config.model
  m.image_res, m.patch_size = 224, 16
  m.vision_width, m.vision_depth, m.vision_heads, m.vision_mlp_dim = 1024, 24, 16, 4096
  m.text_width, m.text_heads, m.text_mlp_dim = 1024, 16, 4096
  m.text_layers, m.fusion_layers, m.vocab_size = 12, 6, 30522
  m.embed_dim = 256
  config.optim.lr = 5e-5
  return common.apply_arg(config, arg)
