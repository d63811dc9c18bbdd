"""Convert a released PyTorch X2-VLM checkpoint into an Orbax params directory.

  python tools/convert_checkpoint.py --checkpoint x2vlm_base_4m.th \
      --config configs/x2vlm_base.py --output ckpt/x2vlm_base_4m
  # a fine-tuning config at another resolution: relative-position tables are interpolated
  python tools/convert_checkpoint.py --checkpoint x2vlm_base_4m.th \
      --config configs/x2vlm_base.py:model.image_res=384 --output ckpt/base_384 \
      --allow-missing 'text/mlm_*'

Fails, listing every missing key, unexpected key and shape mismatch, when the checkpoint does not
match the config (the config's tasks add their heads: a fine-tuned release converts with its
fine-tuning config). `--allow-missing PATTERN` (fnmatch on '/'-joined Flax paths, repeatable) lets the
named parameters start from a fresh init instead. The result loads with
`x2vlm_jax.checkpoint.load_params(DIR)` and as `--config.init.checkpoint=DIR`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax import checkpoint, convert, tasks  # noqa: E402
from x2vlm_jax.configs_loader import load_config  # noqa: E402
from x2vlm_jax.models import x2vlm  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="PyTorch .th/.pth file")
  parser.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
  parser.add_argument("--output", required=True, help="Orbax params directory to create")
  parser.add_argument("--allow-missing", action="append", default=[], metavar="PATTERN")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)

  config = load_config(args.config)
  model = tasks.build_model(config)  # with the heads of the config's tasks
  try:
    params, fresh = convert.convert_checkpoint(args.checkpoint, model,
                                               allow_missing=tuple(args.allow_missing))
  except convert.ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  checkpoint.save_params(args.output, params, overwrite=args.overwrite)
  print(f"wrote {x2vlm.count_params(params):,} parameters to {args.output}"
        + (f" ({len(fresh)} freshly initialised: {', '.join(fresh)})" if fresh else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
