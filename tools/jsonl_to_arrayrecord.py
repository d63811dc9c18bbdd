"""Converts a JSON-lines file into an ArrayRecord file (one record per non-empty line).

  python tools/jsonl_to_arrayrecord.py IN.jsonl OUT.array_record

Records keep the line bytes unchanged, so the pipeline reads them exactly like the JSONL file
(`records.ArrayRecordSource`); bad lines are still reported, as "OUT.array_record:record N".
Files with a name ending in ".array_record" are read as ArrayRecord by `records.make_source`.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax.data import records  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("input", help="JSON-lines file")
  parser.add_argument("output", help="ArrayRecord file to write (name it *.array_record)")
  args = parser.parse_args(argv)
  start = time.time()
  n = records.jsonl_to_array_record(args.input, args.output)
  print(f"wrote {n} records to {args.output} in {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
