"""Acceptance test: the golden fixture made by the PyTorch reference, every output within 1e-4."""
import json
import os
import shutil

import numpy as np
import pytest

from x2vlm_jax import parity

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "pretrain_tiny")


@pytest.fixture(scope="module")
def rows():
  return parity.check_fixture(FIXTURE)


def test_every_reference_output_matches(rows):
  expected = set(np.load(os.path.join(FIXTURE, "outputs.npz")).files)
  assert {r["name"] for r in rows} == expected
  bad = [(r["name"], r["max_abs_err"], r["error"]) for r in rows if not r["ok"]]
  assert not bad, bad
  # Tighter than the acceptance tolerance: float32 vs float32 should agree to ~1e-5.
  assert max(r["max_abs_err"] for r in rows) < 2e-5


def test_finetuned_key_layout_without_wrapper(tmp_path):
  """Fine-tuned releases: no 'model' wrapper, `text_encoder.` without `bert.`, no MLM head."""
  torch = pytest.importorskip("torch")
  state = torch.load(os.path.join(FIXTURE, "checkpoint.th"), map_location="cpu")["model"]
  ft = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in state.items()
        if not k.startswith("text_encoder.cls.")}
  out = tmp_path / "ft"
  out.mkdir()
  torch.save(ft, out / "checkpoint.th")
  manifest = json.load(open(os.path.join(FIXTURE, "manifest.json")))
  manifest["state_dict"] = {k: list(v.shape) for k, v in ft.items()}
  json.dump(manifest, open(out / "manifest.json", "w"))
  shutil.copy(os.path.join(FIXTURE, "inputs.npz"), out / "inputs.npz")
  outputs = dict(np.load(os.path.join(FIXTURE, "outputs.npz")))
  kept = {k: v for k, v in outputs.items() if k in ("itm_logits_pos", "bbox_pred", "text_feat")}
  np.savez(out / "outputs.npz", **kept)
  rows = parity.check_fixture(str(out))
  assert [r["name"] for r in rows] == list(kept) and all(r["ok"] for r in rows), rows

  # An output the checker cannot compute fails instead of being skipped.
  np.savez(out / "outputs.npz", mlm_loss=outputs["mlm_loss"], brand_new_output=np.zeros(3))
  rows = {r["name"]: r for r in parity.check_fixture(str(out))}
  assert not rows["brand_new_output"]["ok"] and "no computation" in rows["brand_new_output"]["error"]
  assert not rows["mlm_loss"]["ok"]  # this model has no MLM head: reported, not skipped


def test_scanned_layer_stacks_match_the_reference_too():
  """The converted checkpoint, stacked for `model.scan_layers`, gives the same outputs."""
  rows = parity.check_fixture(FIXTURE, scan_layers=True)
  bad = [(r["name"], r["max_abs_err"], r["error"]) for r in rows if not r["ok"]]
  assert not bad, bad
  assert len(rows) == len(np.load(os.path.join(FIXTURE, "outputs.npz")).files)
  assert max(r["max_abs_err"] for r in rows) < 2e-5
