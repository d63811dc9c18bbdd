"""Convert a released PyTorch X2-VLM checkpoint into a self-describing params directory.

  python tools/convert_checkpoint.py --list              # the releases (x2vlm_jax/releases.py)
  python tools/convert_checkpoint.py --release x2vlm_base_4m --from x2vlm_base_4m.th \
      --vocab bert-base-uncased/vocab.txt --output ckpt/x2vlm_base_4m
  python tools/convert_checkpoint.py --checkpoint x2vlm_base_4m.th \
      --config configs/x2vlm_base.py --vocab bert-base-uncased/vocab.txt --output ckpt/x2vlm_base_4m
  # a fine-tuning config at another resolution: relative-position tables are interpolated
  python tools/convert_checkpoint.py --checkpoint x2vlm_base_4m.th \
      --config configs/x2vlm_base.py:model.image_res=384 --output ckpt/base_384 \
      --vocab bert-base-uncased/vocab.txt --allow-missing 'text/mlm_*'

`--release NAME` converts with the release's config (`--config` overrides it) and takes the file
from `--from` (a path, a file:// URL or an http(s) URL; default: the release's URL, downloaded into
`--download-dir`); its sha256 is checked when the table knows it, and printed otherwise. The
output directory holds the params (Orbax), `config.json` and a copy of the tokenizer (`--vocab`,
default the config's data.vocab_path), so `Predictor.load(DIR)`, `--checkpoint DIR` and
`--config.init.checkpoint=DIR` need nothing else.

A checkpoint that does not match the config fails with a short report: one summary line, each
differing parameter once, the config fields the checkpoint implies. `--allow-missing PATTERN`
(fnmatch on '/'-joined Flax paths, repeatable) lets the named parameters start from a fresh init.
Every user mistake is one `error: ...` line (or that report) on stderr and exit status 1; a bad
command line exits with 2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

from x2vlm_jax import errors, releases

DEFAULT_DOWNLOAD_DIR = os.path.join("~", ".cache", "x2vlm_jax", "releases")


def build_parser(prog: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--list", action="store_true", help="print the released checkpoints")
  parser.add_argument("--release", metavar="NAME", help="a released checkpoint (--list)")
  parser.add_argument("--from", dest="source", metavar="PATH_OR_URL",
                      help="the release's file: a path, file:// or http(s) URL "
                           "(default: the release's URL)")
  parser.add_argument("--checkpoint", metavar="FILE", help="a PyTorch .th/.pth file (no release)")
  parser.add_argument("--config", metavar="SPEC",
                      help="configs/NAME.py[:arg] (default with --release: the release's)")
  parser.add_argument("--output", metavar="DIR", help="params directory to create")
  parser.add_argument("--vocab", metavar="PATH",
                      help="tokenizer saved with the params (BERT vocab.txt or XLM-R "
                           "sentencepiece .model; default: the config's data.vocab_path)")
  parser.add_argument("--allow-missing", action="append", default=[], metavar="PATTERN")
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--download-dir", default=DEFAULT_DOWNLOAD_DIR, metavar="DIR",
                      help="where an http(s) --from is downloaded (default: %(default)s)")
  return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Exits with status 2 (argparse) on a combination of options that cannot work."""
  if args.list:
    return
  if bool(args.release) == bool(args.checkpoint):
    parser.error("give one of --release NAME or --checkpoint FILE (or --list)")
  if args.source and not args.release:
    parser.error("--from goes with --release (use --checkpoint FILE alone)")
  if args.checkpoint and not args.config:
    parser.error("--checkpoint needs --config SPEC")
  if not args.output:
    parser.error("--output DIR is required")


def fetch(source: str, download_dir: str) -> str:
  """A local path for `source`: a path, a file:// URL, or an http(s) URL downloaded (once) into
  `download_dir`. Raises InputError for a missing file, an unusable URL or a failed download."""
  parsed = urllib.parse.urlparse(source)
  if parsed.scheme == "file":
    path = urllib.request.url2pathname(parsed.path)
    if parsed.netloc not in ("", "localhost") or not os.path.isfile(path):
      raise errors.InputError(f"--from {source}: no such file ({path})")
    return path
  if parsed.scheme in ("http", "https"):
    return _download(source, os.path.expanduser(download_dir))
  if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
    raise errors.InputError(f"--from {source}: unsupported URL scheme {parsed.scheme!r} "
                            "(a path, file://, http:// or https://)")
  if not os.path.isfile(source):
    raise errors.InputError(f"checkpoint file {source}: no such file")
  return source


def _download(url: str, download_dir: str) -> str:
  """`url` -> download_dir/<its file name>, kept for the next run (written as .part first)."""
  name = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint.th"
  target = os.path.join(download_dir, name)
  if os.path.isfile(target):
    print(f"using {target} (downloaded before)")
    return target
  os.makedirs(download_dir, exist_ok=True)
  partial = target + ".part"
  print(f"downloading {url} -> {target}")
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
      shutil.copyfileobj(response, f, length=1 << 20)
  except (urllib.error.URLError, OSError, ValueError) as e:
    raise errors.InputError(f"--from {url}: download failed: {getattr(e, 'reason', e)}") from e
  os.replace(partial, target)
  return target


def verify_sha256(path: str, expected: str | None) -> str:
  """The file's sha256; InputError if `expected` is given and differs."""
  from x2vlm_jax import saved_config  # pylint: disable=import-outside-toplevel

  digest = saved_config.sha256(path)
  if expected is not None and digest != expected.lower():
    raise errors.InputError(f"{path}: sha256 {digest} differs from the release's {expected} "
                            "(a truncated download or another file)")
  return digest


def read_state_dict(path: str) -> dict:
  """The torch state dict in `path` (`convert.load_torch_state_dict`), with a hint for a tar
  archive that torch cannot read."""
  from x2vlm_jax import convert  # pylint: disable=import-outside-toplevel

  try:
    return convert.load_torch_state_dict(path)
  except convert.ConversionError as e:
    if not tarfile.is_tarfile(path):
      raise
    with tarfile.open(path) as archive:
      inner = [m.name for m in archive.getmembers()
               if m.name.endswith((".th", ".pth", ".pt", ".bin"))]
    raise errors.InputError(f"{path} is a tar archive that torch cannot read; extract it "
                            f"(tar xf {path}) and pass the checkpoint inside with --from "
                            f"(PyTorch files in it: {', '.join(inner) or 'none'})") from e


def _load_config(spec: str):
  from x2vlm_jax.configs_loader import load_config  # pylint: disable=import-outside-toplevel

  try:
    return load_config(spec)
  except (KeyError, ValueError) as e:  # an unknown field or flag in the spec's :arg
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise errors.InputError(f"--config {spec}: {message}") from e


def _with_vocab(config, vocab: str | None, spec: str):
  """The config with `data.vocab_path` = `vocab` (checked); InputError when there is none."""
  path = vocab or config.data.vocab_path
  if not path:
    raise errors.InputError(f"--vocab is needed: config {spec} has no data.vocab_path; give the "
                            "tokenizer to save with the params (a BERT vocab.txt, or XLM-R's "
                            "sentencepiece.bpe.model for CCLM)")
  if not os.path.exists(path):
    flag = "--vocab" if vocab else f"config {spec} data.vocab_path"
    raise errors.InputError(f"{flag} {path}: no such file")
  config.data.vocab_path = os.path.abspath(path)  # a locked config still takes new values
  return config


def _check_tokenizer(config) -> None:
  from x2vlm_jax import saved_config  # pylint: disable=import-outside-toplevel
  from x2vlm_jax.data import text  # pylint: disable=import-outside-toplevel

  tokenizer = text.load_tokenizer(saved_config.tokenizer_file(config.data.vocab_path))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise errors.InputError(f"tokenizer {config.data.vocab_path} has {tokenizer.vocab_size} "
                            f"tokens, more than model.vocab_size {config.model.vocab_size}: not "
                            "this model's tokenizer (--vocab)")


def convert(args: argparse.Namespace, table: Sequence[releases.Release]) -> None:
  """Does what the parsed command line asks (after `_check_args`); raises REPORTED errors."""
  from x2vlm_jax import checkpoint, tasks  # pylint: disable=import-outside-toplevel
  from x2vlm_jax import convert as convert_lib  # pylint: disable=import-outside-toplevel
  from x2vlm_jax.models import x2vlm  # pylint: disable=import-outside-toplevel

  if os.path.exists(args.output) and not args.overwrite:
    raise errors.InputError(f"--output {args.output} exists (--overwrite replaces it)")
  release = releases.find(args.release, table) if args.release else None
  spec = args.config or releases.config_spec(release)
  config = _with_vocab(_load_config(spec), args.vocab, spec)
  if release is not None:
    path = fetch(args.source or release.url, args.download_dir)
    digest = verify_sha256(path, release.sha256)
    print(f"{path}: sha256 {digest}"
          + (" (verified)" if release.sha256 else " (the release table has none to compare)"))
  else:
    path = fetch(args.checkpoint, args.download_dir)
  state = read_state_dict(path)
  model = tasks.build_model(config)  # with the heads of the config's tasks
  params, fresh = convert_lib.params_for_model(state, model,
                                               allow_missing=tuple(args.allow_missing),
                                               source=path)
  _check_tokenizer(config)  # after the conversion, whose report says more of a wrong config
  checkpoint.save_params(args.output, params, config=config, overwrite=args.overwrite)
  print(f"wrote {x2vlm.count_params(params):,} parameters, config.json and the tokenizer to "
        f"{args.output}" + (f" ({len(fresh)} freshly initialised: {', '.join(fresh)})"
                            if fresh else ""))


def main(argv: Sequence[str] | None = None, *, prog: str = "x2vlm convert",
         table: Sequence[releases.Release] = releases.RELEASES) -> int:
  """The converter's command line -> exit status (0 done, 1 a reported error; argparse exits
  with 2 on a bad command line). `table`: the releases `--list` and `--release` know."""
  parser = build_parser(prog)
  args = parser.parse_args(argv)
  _check_args(parser, args)
  if args.list:
    print(releases.format_table(table))
    return 0
  try:
    convert(args, table)
  except errors.REPORTED as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
