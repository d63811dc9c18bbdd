"""Checks every record of a training set once and reports the bad ones (file:line and reason).

  python tools/validate_data.py --task image_text --files 'data/cc3m/*.jsonl' \
      --image_root data/cc3m --vocab vocab.txt [--image_res 224 --patch_size 16 --max_bad_fraction 0]
  python tools/validate_data.py --task vqa --files data/vqa_train.json --image_root data/coco \
      --vocab vocab.txt --set answer_list=data/answer_list.json

Runs exactly the training-time record processing of the task (x2vlm_jax/tasks/<task>.py: decode,
crop, boxes, pre_caption, tokenisation) with a fixed seed per record; `--set FIELD=VALUE` sets a
field of the task's data section (config.data.<task>). Exit status 1 when bad / total exceeds
--max_bad_fraction.
"""
import argparse
import collections
import concurrent.futures
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from x2vlm_jax import errors, saved_config, tasks  # noqa: E402
from x2vlm_jax.data import examples as examples_lib  # noqa: E402
from x2vlm_jax.data import records  # noqa: E402
from x2vlm_jax.data import text as text_lib  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", choices=tasks.names(), required=True)
  parser.add_argument("--files", nargs="+", required=True, help="JSONL / ArrayRecord (globs ok)")
  parser.add_argument("--image_root", default="", help="relative image (or video) paths' root")
  parser.add_argument("--vocab", required=True)
  parser.add_argument("--image_res", type=int, default=224)
  parser.add_argument("--patch_size", type=int, default=16)
  parser.add_argument("--max_records", type=int, default=0, help="0 = all")
  parser.add_argument("--max_bad_fraction", type=float, default=0.0)
  parser.add_argument("--threads", type=int, default=4)
  parser.add_argument("--show", type=int, default=20, help="bad records to list")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a field of config.data.<task>, e.g. --set answer_list=a.json")
  args = parser.parse_args(argv)
  try:
    return _validate(args)
  except errors.REPORTED as e:  # a glob matching nothing, a missing vocab
    print(f"error: {e}", file=sys.stderr)
    return 2


def _validate(args) -> int:
  """Checks `args.files` (parsed flags); prints the report; 1 if too many records are bad."""
  logging.getLogger("x2vlm_jax.data.examples").setLevel(logging.ERROR)  # we print our own report

  task = tasks.get(args.task)
  config = common.base_config()
  config.data.vocab_path = args.vocab
  config.model.image_res, config.model.patch_size = args.image_res, args.patch_size
  section = config.data[args.task]
  section.files = list(args.files)
  section["image_root" if "image_root" in section else "video_root"] = args.image_root
  config = common.apply_arg(config, ",".join(f"data.{args.task}.{item}" for item in args.set))
  processor = task.processor(config, text_lib.load_tokenizer(
      saved_config.tokenizer_file(args.vocab, "--vocab")))
  try:
    source = records.make_source(list(args.files))
  except FileNotFoundError as e:
    raise errors.InputError(f"--files: {e}") from e
  n = len(source) if args.max_records <= 0 else min(args.max_records, len(source))

  def check(i):
    out = processor(source[i], np.random.default_rng(i))
    return out if examples_lib.is_bad(out) else None

  with concurrent.futures.ThreadPoolExecutor(max(args.threads, 1)) as pool:
    bad = [b for b in pool.map(check, range(n)) if b is not None]
  reasons = collections.Counter(b.reason.split(":")[0].split("(")[0].strip()[:60] for b in bad)
  print(f"{args.task}: {n} records checked, {len(bad)} bad ({len(bad) / max(n, 1):.2%})")
  for reason, count in reasons.most_common():
    print(f"  {count:8d}  {reason}")
  for b in bad[: args.show]:
    print(f"  {b.where}: {b.reason}")
  return 1 if len(bad) > args.max_bad_fraction * n else 0


if __name__ == "__main__":
  sys.exit(main())
