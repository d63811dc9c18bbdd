"""Convert a released PyTorch X2-VLM checkpoint into a self-describing params directory.

  python tools/convert_checkpoint.py --list
  python tools/convert_checkpoint.py --release x2vlm_base_4m --from x2vlm_base_4m.th \
      --vocab bert-base-uncased/vocab.txt --output ckpt/x2vlm_base_4m
  python tools/convert_checkpoint.py --checkpoint x2vlm_base_4m.th \
      --config configs/x2vlm_base.py --output ckpt/x2vlm_base_4m --vocab bert-base-uncased/vocab.txt
  # a fine-tuning config at another resolution: relative-position tables are interpolated
  python tools/convert_checkpoint.py --checkpoint x2vlm_base_4m.th \
      --config configs/x2vlm_base.py:model.image_res=384 --output ckpt/base_384 \
      --vocab bert-base-uncased/vocab.txt --allow-missing 'text/mlm_*'

The command line is `x2vlm_jax/convert_tool.py` (also `x2vlm convert ...`); releases:
docs/releases.md. The output holds the params, config.json and the tokenizer: it loads with
`Predictor.load(DIR)` and as `--config.init.checkpoint=DIR`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax import convert_tool  # noqa: E402


def main(argv=None) -> int:
  return convert_tool.main(argv, prog="convert_checkpoint.py")


if __name__ == "__main__":
  sys.exit(main())
