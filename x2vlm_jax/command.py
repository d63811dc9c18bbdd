"""The `x2vlm` command (installed by `pip install .`): one entry for every command line.

  x2vlm train   --config configs/demo.py --workdir runs/demo        # = python main.py ...
  x2vlm eval    --config runs/demo --workdir runs/demo_eval --checkpoint runs/demo
  x2vlm convert --release x2vlm_base_4m --from x2vlm_base_4m.th --output ckpt/base
  x2vlm predict retrieve --checkpoint runs/demo --images pics/ --query "a red circle"
  x2vlm embed   --checkpoint runs/demo --images pics/ --out embeddings/

`x2vlm COMMAND --help` describes each; `train` and `eval` take `main.py`'s flags.
"""
from __future__ import annotations

import sys

USAGE = """usage: x2vlm COMMAND [ARGS...]

commands:
  train     train (pre-training or fine-tuning: the config's tasks say which), then evaluate
  eval      the config's evaluators on a checkpoint
  convert   a released PyTorch checkpoint -> a self-describing params dir (--list: the releases)
  predict   one head on your own pictures: retrieve, ground, answer, caption, nlvr, classify
  embed     image / text embeddings of a folder or JSONL to .npy files

'x2vlm COMMAND --help' describes a command."""


def _train_or_eval(mode: str, args: list[str]) -> int:
  from x2vlm_jax import app  # pylint: disable=import-outside-toplevel

  app.run([f"x2vlm {mode}", f"--mode={mode}", *args])
  return 0


def _convert(args: list[str]) -> int:
  from x2vlm_jax import convert_tool  # pylint: disable=import-outside-toplevel

  return convert_tool.main(args)


def _predict(args: list[str]) -> int:
  from x2vlm_jax import predict_cli  # pylint: disable=import-outside-toplevel

  return predict_cli.main(args)


def _embed(args: list[str]) -> int:
  from x2vlm_jax import predict_cli  # pylint: disable=import-outside-toplevel

  return predict_cli.embed_main(args)


COMMANDS = {
    "train": lambda args: _train_or_eval("train", args),
    "eval": lambda args: _train_or_eval("eval", args),
    "convert": _convert,
    "predict": _predict,
    "embed": _embed,
}


def main(argv: list[str] | None = None) -> int:
  """`x2vlm COMMAND ARGS...` -> the command's exit status (2 for an unknown command)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if argv else 2
  command, args = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"x2vlm: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
  return COMMANDS[command](args)


if __name__ == "__main__":
  sys.exit(main())
