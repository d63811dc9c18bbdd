"""The model of the shipped parity fixture, tests/fixtures/pretrain_tiny (the reference's
pre-training model at tiny sizes with random weights; its manifest.json gives these numbers):
configs/tiny.py at 64 px, widths 64, 2 text + 2 fusion layers, a 512-token vocabulary.

  x2vlm convert --checkpoint tests/fixtures/pretrain_tiny/checkpoint.th \
      --config configs/fixture_tiny.py --vocab tests/fixtures/pretrain_tiny/vocab.txt \
      --output ckpt/fixture
arg: `field=value` overrides.
"""
from configs import common
from configs import tiny


def get_config(arg=None):
  arg = common.parse_arg(arg, file="configs/fixture_tiny.py")
  config = tiny.get_config()
  config.unlock()
  m = config.model
  m.image_res, m.vision_width, m.vision_mlp_dim = 64, 64, 256
  m.text_width, m.text_mlp_dim, m.text_layers, m.fusion_layers = 64, 128, 2, 2
  m.vocab_size, m.max_position, m.embed_dim = 512, 64, 32
  return common.finish(config, arg)
