"""The released PyTorch checkpoints of X2-VLM and CCLM, and the config each one converts with.

The table is what the reference repository's README (github.com/zengyan-97/X2-VLM, commit
21ed5a5, sections "Pretrain > Checkpoints" and "Finetune > Checkpoints, Configs and Logs")
publishes: ten `.th` / `.tar` files behind direct links. The README gives no checksums, so every
`sha256` is None until someone records the digest of a file they downloaded (the converter prints
it). Sizes are estimates: the parameter count of the config's model x 4 bytes (fp32), not
measured downloads.

  releases.find("x2vlm_base_4m").config         # 'configs/x2vlm_base.py'
  releases.config_spec(releases.find("x2vlm_base_4m"))  # the same, absolute (project root)
  print(releases.format_table())                # what `convert_checkpoint.py --list` prints

Config specs use the `:arg` grammar of every config file (configs/common.py) and are resolved
against the project root (the directory holding `configs/`), never the current directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Sequence

from x2vlm_jax import errors

README = "https://github.com/zengyan-97/X2-VLM#checkpoints"
_URL = "https://lf-robot-opensource.bytetos.com/obj/lab-robot-public/x2vlm_ckpts_2release/"
_PRETRAIN = "README 'Pretrain > Checkpoints'"
_FINETUNE = "README 'Finetune > Checkpoints, Configs and Logs'"
# CCLM: XLM-R text layers under X2-VLM's fusion layers, with its own (untied) MLM decoder.
_CCLM = ("configs/finetune/multilingual_retrieval.py:{size},model.image_res=224,"
         "model.mlm_head=True,model.mlm_decoder_tied=False")


@dataclasses.dataclass(frozen=True)
class Release:
  """One released checkpoint.

  name: the name `--release` takes (the file's stem; the COCO retrieval files, published as
    `xvlm_beit_1b{,_large}_stage2_coco_rerun.th`, are named for their size and task).
  task: what it was trained for.
  url: the direct link the README gives.
  published: where the README publishes it.
  config: the config spec it converts with, relative to the project root (`configs/...[:arg]`).
  image_res: the resolution it was trained at (its relative-position tables' grid x 16).
  size: approximate size of the file.
  sha256: hex digest of the file, None where not known.
  notes: what is not known about the file, or how to use it.
  """
  name: str
  task: str
  url: str
  published: str
  config: str
  image_res: int
  size: str
  sha256: str | None = None
  notes: str = ""

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


RELEASES: tuple[Release, ...] = (
    Release("x2vlm_base_4m", "pre-training (4M images)", _URL + "x2vlm_base_4m.th", _PRETRAIN,
            "configs/x2vlm_base.py", 224, "~1.0 GB"),
    Release("x2vlm_large_4m", "pre-training (4M images)", _URL + "x2vlm_large_4m.th", _PRETRAIN,
            "configs/x2vlm_large.py", 224, "~2.4 GB"),
    Release("x2vlm_base_1b", "pre-training (1B images + video)", _URL + "x2vlm_base_1b.th",
            _PRETRAIN, "configs/x2vlm_base.py", 224, "~1.0 GB",
            notes="if the file holds the stage-2 video frame embedding, the converter's report "
                  "says model.num_frames=N: add it to the config's :arg"),
    Release("x2vlm_large_1b", "pre-training (1B images + video)", _URL + "x2vlm_large_1b.th",
            _PRETRAIN, "configs/x2vlm_large.py", 224, "~2.4 GB",
            notes="as x2vlm_base_1b for a video frame embedding"),
    Release("cclm_x2vlm_base", "multilingual pre-training (CCLM, XLM-R-base text)",
            _URL + "cclm_x2vlm_base.th", _PRETRAIN, _CCLM.format(size="base"), 224, "~2.5 GB",
            notes="tokenizer: XLM-R's sentencepiece.bpe.model (--vocab)"),
    Release("cclm_x2vlm_large", "multilingual pre-training (CCLM, XLM-R-large text)",
            _URL + "cclm_x2vlm_large.th", _PRETRAIN, _CCLM.format(size="large"), 224, "~4.9 GB",
            notes="tokenizer: XLM-R's sentencepiece.bpe.model (--vocab)"),
    Release("x2vlm_base_1b_vqa", "VQA v2 (generative answer decoder)",
            _URL + "x2vlm_base_1b_vqa.th", _FINETUNE, "configs/finetune/vqa.py", 768, "~1.3 GB"),
    Release("x2vlm_large_1b_vqa", "VQA v2 (generative answer decoder)",
            _URL + "x2vlm_large_1b_vqa.th", _FINETUNE, "configs/finetune/vqa.py:large", 768,
            "~2.9 GB"),
    Release("x2vlm_large_1b_captioning", "COCO captioning (MLM generation)",
            _URL + "x2vlm_large_1b_captioning.tar", _FINETUNE,
            "configs/finetune/coco_captioning.py:large", 384, "~2.4 GB",
            notes="a .tar whose contents are not documented: if torch cannot read it, extract "
                  "it and pass the checkpoint inside with --from"),
    Release("x2vlm_large_1b_grounding", "RefCOCO+ grounding (box head)",
            _URL + "x2vlm_large_1b_grounding.tar", _FINETUNE,
            "configs/finetune/refcoco_grounding.py:large", 384, "~2.4 GB",
            notes="a .tar, as x2vlm_large_1b_captioning"),
    Release("x2vlm_base_1b_coco_retrieval", "COCO retrieval (the README's 'rerun')",
            _URL + "xvlm_beit_1b_stage2_coco_rerun.th", _FINETUNE,
            "configs/finetune/coco_retrieval.py", 384, "~1.0 GB"),
    Release("x2vlm_large_1b_coco_retrieval", "COCO retrieval (the README's 'rerun')",
            _URL + "xvlm_beit_1b_large_stage2_coco_rerun.th", _FINETUNE,
            "configs/finetune/coco_retrieval.py:large", 384, "~2.4 GB"),
)


def project_root() -> str:
  """The directory holding `configs/` (the repository, or site-packages when installed)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_spec(release: Release) -> str:
  """The release's config spec with its file made absolute against `project_root()`."""
  path, colon, arg = release.config.partition(":")
  return os.path.join(project_root(), path) + colon + arg


def find(name: str, table: Sequence[Release] = RELEASES) -> Release:
  """The release called `name` in `table`.

  Raises:
    errors.InputError: no such release, naming the closest names and listing the known ones.
  """
  for release in table:
    if release.name == name:
      return release
  names = [r.name for r in table]
  close = difflib.get_close_matches(name, names, n=3)
  guess = f"did you mean {' or '.join(close)}? " if close else ""
  raise errors.InputError(f"unknown release {name!r}: {guess}known releases: {', '.join(names)} "
                          "(--list describes them)")


def format_table(table: Sequence[Release] = RELEASES) -> str:
  """The releases as an aligned text table (name, task, config, image_res, size, file), then
  the notes and where the files are."""
  header = ("name", "task", "config", "image_res", "size", "file")
  rows = [header] + [(r.name, r.task, r.config, str(r.image_res), r.size, r.filename)
                     for r in table]
  widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
           for row in rows]
  notes = [f"  {r.name}: {r.notes}" for r in table if r.notes]
  folders = sorted({r.url[:-len(r.filename)] for r in table})
  known = sum(r.sha256 is not None for r in table)
  footer = [f"files: {' '.join(f + '<file>' for f in folders)} (as published in {README})",
            f"sha256 known for {known} of {len(table)}; sizes are estimates (parameters x 4 bytes)"]
  return "\n".join(lines + (["notes:"] + notes if notes else []) + footer)
