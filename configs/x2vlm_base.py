"""X2-VLM-base: BEiT-2 ViT-B/16 + BERT-base (12 text + 6 fusion layers), 254,758,401 parameters.

Pre-training (4M-image recipe of the reference, configs/pretrain/x2vlm_base_4m.yaml):
  python main.py --config configs/x2vlm_base.py --workdir runs/base \
      --config.data.image_text.files='["/data/cc3m/*.jsonl"]' --config.data.regions.files=...
"""

from configs import common


def get_config(arg=None):
  config = common.base_config()
  m = config.model
  m.image_res, m.patch_size = 224, 16
  m.vision_width, m.vision_depth, m.vision_heads, m.vision_mlp_dim = 768, 12, 12, 3072
  m.text_width, m.text_heads, m.text_mlp_dim = 768, 12, 3072
  m.text_layers, m.fusion_layers, m.vocab_size = 12, 6, 30522
  m.embed_dim = 256
  config.optim.lr = 1e-4
  return common.apply_arg(config, arg)
