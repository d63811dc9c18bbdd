"""Parity of x2vlm_jax with the PyTorch reference on a golden fixture folder.

  python tools/check_parity.py tests/fixtures/pretrain_tiny [--scan-layers]

Prints one line per output (max abs error, tolerance) and exits 1 if any output exceeds
1e-4 * max(1, max|reference|) or cannot be computed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2vlm_jax.parity import check_fixture  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("fixture_dir")
  parser.add_argument("--rtol_scale", type=float, default=1e-4)
  parser.add_argument("--scan-layers", action="store_true",
                      help="check the model with model.scan_layers=True (stacked layer params)")
  args = parser.parse_args()
  rows = check_fixture(args.fixture_dir, rtol_scale=args.rtol_scale, scan_layers=args.scan_layers)
  width = max(len(r["name"]) for r in rows)
  for r in rows:
    status = "ok  " if r["ok"] else "FAIL"
    print(f"{status} {r['name']:<{width}} {str(r['shape']):<14} max_abs_err={r['max_abs_err']:.3e} "
          f"tol={r['tolerance']:.1e} {r['error']}")
  failed = [r["name"] for r in rows if not r["ok"]]
  print(f"{len(rows) - len(failed)}/{len(rows)} outputs within tolerance")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
