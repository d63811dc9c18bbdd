"""x2vlm_jax command line: training (pre-training or fine-tuning) and evaluation.

  python main.py --config configs/demo.py --workdir runs/demo
  python main.py --mode eval --config runs/demo --workdir runs/demo_eval --checkpoint runs/demo

The program is `x2vlm_jax/app.py` (its docstring lists the flags); `x2vlm train|eval` (after
`pip install -e .`) runs the same.
"""
from x2vlm_jax import app

if __name__ == "__main__":
  app.run()
