"""Writes the synthetic "shapes" demo dataset (see x2vlm_jax/data/demo.py for the formats).

  python tools/make_demo_data.py --out /tmp/demo [--num_train 2000 --num_val 100 --image_size 96 --seed 0]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax.data import demo  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--num_val", type=int, default=100)
  parser.add_argument("--image_size", type=int, default=96)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  start = time.time()
  paths = demo.make_demo_data(args.out, num_train=args.num_train, num_val=args.num_val,
                              image_size=args.image_size, seed=args.seed)
  print(f"wrote {args.num_train} train + {args.num_val} val scenes to {args.out} "
        f"in {time.time() - start:.1f} s")
  for k, v in sorted(paths.items()):
    print(f"  {k}: {v}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
