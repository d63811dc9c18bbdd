"""A small X2-VLM for throughput benchmarks (tools/benchmark.py, docs/benchmarks.md).

ViT-S/16-sized vision tower (384 wide, 6 blocks, 6 heads, MLP 1536) at 224x224 and a 384-wide BERT
(6 text + 3 fusion layers, 6 heads, FFN 1536, full 30522-token vocabulary). One optimizer step is
one region batch (all five losses: ITC, ITM, MLM, box L1 + GIoU) of 8 images and 8 region texts of
30 tokens with 6 masked positions; AdamW with global-norm clipping 1.0 (the defaults), dropout and
drop-path as the model defaults (0.1). One device, no sharding.

  python tools/benchmark.py --config configs/bench_small.py --steps 10
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, file="configs/bench_small.py")
  config = common.base_config()
  m = config.model
  m.image_res, m.patch_size = 224, 16
  m.vision_width, m.vision_depth, m.vision_heads, m.vision_mlp_dim = 384, 6, 6, 1536
  m.text_width, m.text_heads, m.text_mlp_dim = 384, 6, 1536
  m.text_layers, m.fusion_layers, m.vocab_size = 6, 3, 30522
  m.embed_dim = 256

  d = config.data
  d.max_tokens = d.max_words = 30
  d.max_masks = 6
  d.regions.max_images, d.regions.batch_size = 8, 8

  t = config.train
  t.tasks = {"regions": 1.0}
  t.total_steps = 1000
  config.optim.warmup_steps = 0.1  # the default (2500 steps) would exceed total_steps

  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  return common.finish(config, arg)
