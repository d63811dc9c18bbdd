"""Video: PyAV decoding, frame sampling, clip augmentation, bad videos skipped and counted, video
batches through the train step, and video retrieval / QA evaluation from the CLI code path.

The test videos are made on the fly: frame k shows its number k as 8 black/white blocks along the
top (robust to lossy codecs) and a red square whose left edge is at x = 4 + 2 (k mod 24).
"""
import base64
import json
import logging
import os

import av
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common, tiny
from x2vlm_jax import checkpoint, cli, tasks, train
from x2vlm_jax.data import image_ops
from x2vlm_jax.data import pipeline
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.data import video
from x2vlm_jax.data import video_examples
from x2vlm_jax.evaluate import common as eval_common
from x2vlm_jax.evaluate import retrieval_metrics
from x2vlm_jax.models import loading, x2vlm
from x2vlm_jax.tasks import video_qa, video_retrieval

FIXTURE_VOCAB = os.path.join(os.path.dirname(__file__), "fixtures", "pretrain_tiny", "vocab.txt")
RED = (220, 40, 40)


def frame_image(k: int, size: int = 64, background=(20, 20, 20)) -> np.ndarray:
  img = np.zeros((size, size, 3), np.uint8)
  img[:] = background
  for b in range(8):
    img[0:8, 8 * b:8 * b + 8] = 235 if (k >> b) & 1 else 16
  x = 4 + 2 * (k % 24)
  img[28:44, x:x + 12] = RED
  return img


def frame_number(frame: np.ndarray) -> int:
  return sum(1 << b for b in range(8) if frame[1:7, 8 * b + 1:8 * b + 7].mean() > 128)


def square_left(frame: np.ndarray) -> float:
  """Left edge of the red square (mean over its rows of the first red column)."""
  red = (frame[..., 0] > 150) & (frame[..., 1] < 110) & (frame[..., 2] < 110)
  rows = red[30:42]
  return float(np.mean([np.argmax(r) for r in rows if r.any()]))


def write_video(path, num_frames: int, codec: str = "mpeg4", size: int = 64, gop: int = 6,
                background=(20, 20, 20)) -> str:
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=24)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.gop_size = gop
    stream.bit_rate = 4_000_000
    for k in range(num_frames):
      frame = av.VideoFrame.from_ndarray(frame_image(k, size, background), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  return dict(mp4=write_video(root / "clip.mp4", 24),  # frame count in the header
              webm=write_video(root / "clip.webm", 72, codec="libvpx"),  # counted from packets
              root=root)


# ---------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("kind,n", [("mp4", 24), ("webm", 72)])
def test_decoded_frames_are_the_written_frames(videos, kind, n):
  clip = video.read_clip(videos[kind], n, "uniform")
  assert clip.num_source_frames == n and clip.indices.tolist() == list(range(n))
  for k, frame in enumerate(clip.frames):
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert frame_number(frame) == k
    assert abs(square_left(frame) - (4 + 2 * (k % 24))) <= 1.0, k
    np.testing.assert_allclose(frame[34:38, 4 + 2 * (k % 24) + 4:4 + 2 * (k % 24) + 8].mean((0, 1)),
                               RED, atol=25)
    assert abs(float(frame[50:60, 20:40].mean()) - 20) < 6


def test_sampling_indices_follow_the_reference():
  assert video.segment_indices(24, 4).tolist() == [0, 6, 12, 18]
  assert video.segment_indices(10, 4).tolist() == [0, 3, 6, 8]  # segments 3, 3, 2, 2
  assert video.segment_indices(3, 5).tolist() == [0, 0, 1, 1, 2]  # [i % n], sorted
  # fps: 72 frames at 24 fps = frames 0, 24, 48 (one per second), then uniform over those.
  assert video.sample_frame_indices(72, 2, "fps", fps=24.0).tolist() == [0, 48]
  assert video.sample_frame_indices(72, 4, "fps", fps=24.0).tolist() == [0, 0, 24, 48]
  # 100 frames at 30 fps: 0, 30, 60, 90; segments of 2, 1, 1 of those.
  assert video.sample_frame_indices(100, 3, "fps", fps=30.0).tolist() == [0, 60, 90]
  for n, f in ((10, 4), (24, 5), (7, 7)):
    starts_lengths = set()
    for seed in range(200):
      idx = video.sample_frame_indices(n, f, "random_segment", np.random.default_rng(seed))
      again = video.sample_frame_indices(n, f, "random_segment", np.random.default_rng(seed))
      np.testing.assert_array_equal(idx, again)  # seeded-deterministic
      assert len(idx) == f and np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < n
      # Each index lies in its own segment: segments are n // f or n // f + 1 long and tile n.
      assert np.all(idx - np.arange(f) * (n // f) >= 0)
      assert np.all(idx - np.arange(f) * (n // f) <= (n % f) + (n // f) - 1)
      starts_lengths.add(tuple(idx))
    assert len(starts_lengths) == 1 if n == f else len(starts_lengths) > 20  # varies with seed
  for seed in range(50):  # 24 frames in 4 segments of exactly 6: one frame from each
    idx = video.sample_frame_indices(24, 4, "random_segment", np.random.default_rng(seed))
    assert (idx // 6).tolist() == [0, 1, 2, 3]
  short = video.sample_frame_indices(3, 6, "random_segment", np.random.default_rng(0))
  assert sorted(set(short.tolist())) == [0, 1, 2] and np.all(np.diff(short) >= 0)


def _spy_seeks(monkeypatch):
  """Counts container.seek calls made by video._decode_targets."""
  seeks = []
  original = video._open_video

  class Spy:
    def __init__(self, container):
      self._c = container

    def seek(self, *args, **kwargs):
      seeks.append(args[0])
      return self._c.seek(*args, **kwargs)

    def __getattr__(self, name):
      return getattr(self._c, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return self._c.__exit__(*exc)

  monkeypatch.setattr(video, "_open_video", lambda p: (lambda c, s: (Spy(c), s))(*original(p)))
  return seeks


@pytest.mark.parametrize("kind", ["mp4", "webm"])
def test_uniform_clip_and_seeking_decode_the_expected_frames(videos, kind, monkeypatch):
  n = {"mp4": 24, "webm": 72}[kind]
  sequential = video.read_clip(videos[kind], 4, "uniform", seek_gap=None)
  expected = video.segment_indices(n, 4).tolist()
  assert sequential.indices.tolist() == expected
  assert [frame_number(f) for f in sequential.frames] == expected
  seeks = _spy_seeks(monkeypatch)
  sought = video.read_clip(videos[kind], 4, "uniform", seek_gap=2)
  assert len(seeks) == 3  # one per frame after the first
  for a, b in zip(sequential.frames, sought.frames):
    np.testing.assert_array_equal(a, b)
  rng = np.random.default_rng(5)
  clip = video.read_clip(videos[kind], 5, "random_segment", rng, seek_gap=2)
  assert [frame_number(f) for f in clip.frames] == clip.indices.tolist()


def test_a_header_promising_more_frames_resamples_over_the_real_ones(videos, monkeypatch):
  real = video._video_info(videos["mp4"])
  monkeypatch.setattr(video, "_video_info", lambda p: (40, real[1]))
  clip = video.read_clip(videos["mp4"], 4, "uniform")
  assert clip.num_source_frames == 24 and clip.indices.tolist() == [0, 6, 12, 18]
  assert [frame_number(f) for f in clip.frames] == [0, 6, 12, 18]


def test_frame_folder_and_frame_list_read_like_the_video(videos, tmp_path):
  decoded = video.read_clip(videos["mp4"], 24, "uniform").frames
  folder = tmp_path / "frames"
  folder.mkdir()
  for k, frame in enumerate(decoded):  # frame_1 .. frame_24: natural order, not lexicographic
    Image.fromarray(frame).save(folder / f"frame_{k + 1}.png")
  (folder / "notes.txt").write_text("not a frame")
  frame_list = tmp_path / "frames.json"
  encoded = []
  for frame in decoded:
    Image.fromarray(frame).save(tmp_path / "f.png")
    encoded.append(base64.b64encode((tmp_path / "f.png").read_bytes()).decode())
  frame_list.write_text(json.dumps(encoded))
  for sampling, rng in (("uniform", None), ("random_segment", 3)):
    clips = [video.read_clip(str(path), 5, sampling,
                             None if rng is None else np.random.default_rng(rng))
             for path in (videos["mp4"], folder, frame_list)]
    for other in clips[1:]:
      np.testing.assert_array_equal(other.indices, clips[0].indices)
      for a, b in zip(clips[0].frames, other.frames):
        np.testing.assert_array_equal(a, b)
  fps = video.read_clip(str(folder), 3, "fps", folder_fps=4.0)  # 24 frames at 4 fps: 6 seconds
  assert fps.indices.tolist() == [0, 8, 16]


# ---------------------------------------------------------------------------------- processors
def _config(**fields):
  """The full default config (unlocked) at 32 px in 16 px patches, with `fields` ("a.b": value,
  under config.data) set."""
  config = common.base_config()
  config.model.image_res, config.model.patch_size = 32, 16
  cfg = config.data
  cfg.vocab_path = FIXTURE_VOCAB
  cfg.max_tokens, cfg.max_masks = 12, 4
  cfg.read_threads, cfg.prefetch = 2, 0
  cfg.shuffle = False
  for key, value in fields.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _data_cfg(**fields):
  return _config(**fields).data


def test_one_crop_flip_and_randaug_for_every_frame(videos, tmp_path):
  still = tmp_path / "still"
  still.mkdir()
  for k in range(6):  # six identical frames: the processed frames must be identical too
    Image.fromarray(frame_image(3)).save(still / f"{k:02d}.png")
  cfg = _data_cfg(**{"video_text.num_frames": 4, "video_text.randaug": True,
                     "video_text.hflip_prob": 1.0})
  encoder = text_lib.TextEncoder.from_config(cfg)
  processor = video_examples.VideoTextProcessor(cfg, cfg.video_text, 32, 16, encoder)
  flips = []
  for seed in range(6):
    out = processor.process("x:1", {"video": str(still), "caption": "a dog on the left"},
                            np.random.default_rng(seed))
    assert out["frames"].shape == (4, 32, 32, 3) and out["frames"].dtype == np.float32
    for k in range(1, 4):
      np.testing.assert_array_equal(out["frames"][k], out["frames"][0])
    flips.append(out["frames"][0])
  assert not all(np.array_equal(flips[0], f) for f in flips[1:])  # crops differ between clips
  right = encoder.token_ids("a dog on the right")
  np.testing.assert_array_equal(out["text_ids"][:len(right)], right)  # caption follows the flip

  # On the moving clip: flipped == the unflipped clip mirrored (same crop, frame by frame).
  cfg_no = _data_cfg(**{"video_text.num_frames": 4, "video_text.randaug": False,
                        "video_text.hflip_prob": 0.0})
  cfg_yes = _data_cfg(**{"video_text.num_frames": 4, "video_text.randaug": False,
                         "video_text.hflip_prob": 1.0})
  rec = {"video": videos["mp4"], "caption": "a red square"}
  plain = video_examples.VideoTextProcessor(cfg_no, cfg_no.video_text, 32, 16, encoder).process(
      "x:1", rec, np.random.default_rng(7))
  mirrored = video_examples.VideoTextProcessor(cfg_yes, cfg_yes.video_text, 32, 16,
                                               encoder).process("x:1", rec,
                                                                np.random.default_rng(7))
  np.testing.assert_allclose(mirrored["frames"], plain["frames"][:, :, ::-1], atol=1e-6)
  assert not np.allclose(plain["frames"][0], plain["frames"][3])  # the square moved


def test_video_qa_keeps_left_right_questions_unflipped_and_ignores_unknown_answers(videos,
                                                                                 tmp_path):
  answers = tmp_path / "ans2label.json"
  answers.write_text(json.dumps({"red": 0, "blue": 1, "left": 2}))  # the reference's format
  cfg = _data_cfg(**{"video_qa.num_frames": 3, "video_qa.randaug": False,
                     "video_qa.hflip_prob": 1.0, "video_qa.answer_list": str(answers)})
  encoder = text_lib.TextEncoder.from_config(cfg)
  processor = video_qa.VideoQaProcessor(cfg, cfg.video_qa, 32, 16, encoder)
  rng = lambda: np.random.default_rng(1)
  side = processor.process("q:1", {"video": videos["mp4"], "question": "where is the square",
                                   "answer": "left"}, rng())
  colour = processor.process("q:2", {"video": videos["mp4"], "question": "what colour",
                                     "answer": ["red", "red", "blue"]}, rng())
  unknown = processor.process("q:3", {"video": videos["mp4"], "question": "what colour",
                                      "answer": "purple"}, rng())
  assert (int(side["answer_label"]), int(colour["answer_label"]),
          int(unknown["answer_label"])) == (2, 0, -100)
  np.testing.assert_allclose(colour["frames"], unknown["frames"])
  cfg.video_qa.hflip_prob = 0.0
  never = video_qa.VideoQaProcessor(cfg, cfg.video_qa, 32, 16, encoder)
  for out, rec in ((side, {"question": "where is the square", "answer": "left"}),
                   (colour, {"question": "what colour", "answer": ["red", "red", "blue"]})):
    plain = never.process("q", dict(rec, video=videos["mp4"]), rng())
    if out is side:  # "left" in the answer: never flipped
      np.testing.assert_array_equal(out["frames"], plain["frames"])
    else:
      np.testing.assert_allclose(out["frames"], plain["frames"][:, :, ::-1], atol=1e-6)
  batch = video_qa.collate([side, colour, unknown])
  assert batch["frames"].shape == (3, 3, 32, 32, 3)
  assert batch["answer_label"].tolist() == [2, 0, -100]


def test_bad_videos_are_skipped_counted_and_named(videos, tmp_path, caplog):
  root = tmp_path
  (root / "empty.mp4").write_bytes(b"")
  (root / "garbage.mp4").write_bytes(b"this is not a video" * 20)
  write_video(root / "short.mp4", 2)
  (root / "no_frames").mkdir()
  good = os.path.relpath(videos["mp4"], root)
  lines = [{"video": good, "caption": "a red square"},
           {"video": "garbage.mp4", "caption": "a red square"},
           {"video": "empty.mp4", "caption": "a red square"},
           {"video": "short.mp4", "caption": "a red square"},
           {"video": "missing.mp4", "caption": "a red square"},
           {"video": "no_frames", "caption": "a red square"},
           {"video": good, "caption": "a square on the left"}]
  jsonl = root / "train.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
  config = _config(**{"video_text.files": [str(jsonl)], "video_text.video_root": str(root),
                      "video_text.batch_size": 2, "video_text.num_frames": 3,
                      "video_text.min_frames": 3, "max_bad_fraction": 1.0})
  task = tasks.get("video_text")
  with caplog.at_level(logging.WARNING):
    it = task.make_iterator(config, seed=0)
    batch = next(it)
  assert batch["frames"].shape == (2, 3, 32, 32, 3)
  assert int(batch["num_bad_records"]) == 5 and int(batch["num_records"]) == 7
  assert batch["video_idx"][0] == batch["video_idx"][1]  # the same video twice
  log = caplog.text
  for line, reason in ((2, "cannot open video"), (3, "empty (0 bytes)"),
                       (4, "has 2 frames, fewer than min_frames=3"), (5, "video not found"),
                       (6, "has no frames")):
    assert f"{jsonl}:{line}" in log and reason in log, (line, reason)
  for name in ("garbage.mp4", "empty.mp4", "short.mp4", "missing.mp4", "no_frames"):
    assert name in log

  config.data.max_bad_fraction, config.data.min_records_before_abort = 0.5, 4
  it = task.make_iterator(config, seed=0)
  with pytest.raises(pipeline.BadDataError, match="records were bad"):
    next(it)


# ---------------------------------------------------------------------------------- training
COLOURS = {"red": (220, 40, 40), "blue": (40, 40, 220), "green": (40, 200, 40),
           "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
  """8 small clips (one background colour each) with captions and questions, an answer list,
  and the evaluation files."""
  root = tmp_path_factory.mktemp("video_tasks")
  names = list(COLOURS)
  text, qa, ret_eval, qa_eval = [], [], [], []
  for n in range(8):
    colour = names[n % 4]
    path = write_video(root / f"v{n}.mp4", 12, size=32, gop=4, background=COLOURS[colour])
    text.append({"video": os.path.basename(path), "caption": [f"a {colour} video",
                                                              f"the {colour} square"]})
    qa.append({"video": os.path.basename(path), "question": "what colour is it",
               "answer": colour if n < 7 else "purple"})
    if n < 4:
      ret_eval.append({"video": os.path.basename(path),
                       "caption": [f"a {colour} video", f"the {colour} square"]})
      qa_eval.append(qa[-1] if n < 3 else dict(qa[-1], answer="purple"))
  files = {}
  for name, rows in (("train_video.jsonl", text), ("train_qa.jsonl", qa),
                     ("msrvtt_test.jsonl", ret_eval),
                     ("qa_test.jsonl", qa_eval)):
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    files[name] = str(root / name)
  (root / "answers.json").write_text(json.dumps(names))
  files["answers"] = str(root / "answers.json")
  files["root"] = str(root)
  return files


def _task_config(task_data):
  config = tiny.get_config()
  config.unlock()
  m = config.model
  m.num_frames, m.vocab_size, m.vision_depth = 3, 512, 1
  m.hidden_dropout = m.attention_dropout = m.drop_path_rate = 0.0
  d = config.data
  d.vocab_path = FIXTURE_VOCAB
  d.read_threads, d.prefetch = 2, 0
  d.video_text.files = [task_data["train_video.jsonl"]]
  d.video_qa.files = [task_data["train_qa.jsonl"]]
  d.video_qa.answer_list = task_data["answers"]
  d.video_qa.num_answers = 4
  for sub in (d.video_text, d.video_retrieval, d.video_qa):
    sub.video_root, sub.num_frames, sub.batch_size, sub.randaug = task_data["root"], 3, 8, False
  t = config.train
  t.tasks = {"video_text": 1.0, "video_qa": 0.5}
  t.total_steps = 100
  config.optim.lr, config.optim.warmup_steps = 2e-3, 0.0
  config.evals.video_retrieval = common.evaluator(
      "video_retrieval", file=task_data["msrvtt_test.jsonl"], video_root=task_data["root"],
      k_test=8, batch_size=8, save_scores=True)
  config.evals.video_qa = common.evaluator(
      "video_qa", files=(task_data["qa_test.jsonl"],), video_root=task_data["root"], batch_size=8)
  return config


def test_video_text_and_video_qa_batches_train(task_data):
  config = _task_config(task_data)
  tasks.validate(config, training=True)
  trainer = train.Trainer.create(config)
  assert tuple(trainer.tasks) == ("video_qa", "video_text")
  iterators = trainer.make_data_iterators()
  local = {kind: next(it) for kind, it in iterators.items()}
  assert local["video_text"]["frames"].shape == (8, 3, 32, 32, 3)
  assert local["video_qa"]["frames"].shape == (8, 3, 32, 32, 3)
  assert sorted(local["video_qa"]["answer_label"].tolist()) == [-100, 0, 0, 1, 1, 2, 2, 3]
  batches = trainer.global_batches(local)
  state = trainer.init_state(0)
  losses = []
  for step in range(8):
    state, metrics = trainer.train_step(state, batches, jax.random.PRNGKey(step))
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    assert all(np.isfinite(v) for v in scalars.values()), scalars
    assert scalars["loss"] == pytest.approx(
        scalars["video_text/loss"] + 0.5 * scalars["video_qa/loss"], rel=1e-5)
    assert scalars["video_text/loss"] == pytest.approx(
        scalars["video_text/itc"] + scalars["video_text/itm"] + scalars["video_text/mlm"],
        rel=1e-5)
    losses.append(scalars)
  assert losses[0]["video_qa/video_qa"] == pytest.approx(np.log(4), abs=0.3)
  assert losses[0]["video_text/mlm"] == pytest.approx(np.log(512), abs=1.0)
  for key in ("loss", "video_text/mlm", "video_qa/video_qa"):
    assert losses[-1][key] < 0.9 * losses[0][key], (key, [round(s[key], 3) for s in losses])


def test_video_retrieval_batches_read_their_own_section(task_data):
  """video_retrieval reads video-text records from config.data.video_retrieval (crop 0.5),
  video_text from config.data.video_text (crop 0.2); both declare what they need."""
  config = _task_config(task_data)
  assert config.data.video_text.crop_scale_min == 0.2
  assert config.data.video_retrieval.crop_scale_min == 0.5
  config.data.video_retrieval.files = [task_data["train_video.jsonl"]]
  config.data.video_retrieval.batch_size = 4
  batch = next(tasks.get("video_retrieval").make_iterator(config, seed=0))
  assert batch["frames"].shape == (4, 3, 32, 32, 3) and batch["video_idx"].shape == (4,)
  assert sorted(batch) == sorted([*video_examples.VIDEO_TEXT_FIELDS, "num_bad_records",
                                  "num_records"])
  config.train.tasks = {"video_retrieval": 1.0}
  assert tasks.new_param_patterns(config)[-1] == r"(^|/)frame_pos_embed$"
  assert "frame_pos_embed" in tasks.allow_missing(config)
  config.train.tasks = {"video_qa": 1.0}
  assert set(tasks.allow_missing(config)) >= {"frame_pos_embed", "vqa_head/*"}
  assert r"^vqa_head/" in tasks.new_param_patterns(config)


def test_video_objectives():
  """video_retrieval = ITC + ITM with same-video positives; video_text adds MLM; video_qa's
  cross-entropy skips answers outside the list (one compiled function for all three)."""
  cfg = tiny.get_config()
  cfg.unlock()
  cfg.model.num_frames, cfg.model.vision_depth = 2, 1
  model = x2vlm.build_model(cfg.model, heads=((video_qa.HEAD, 3, 1),))
  params = nn.meta.unbox(
      jax.jit(model.init)(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"])
  rng = np.random.default_rng(0)
  b, l = 4, 6
  batch = dict(frames=rng.normal(size=(b, 2, 32, 32, 3)).astype(np.float32),
               text_ids=rng.integers(5, 60, (b, l)).astype(np.int32),
               text_atts=np.ones((b, l), np.int32), video_idx=np.array([7, 7, 3, 9], np.int32),
               text_ids_masked=rng.integers(5, 60, (b, l)).astype(np.int32),
               masked_pos=np.tile(np.array([[1, 2]], np.int32), (b, 1)),
               masked_ids=np.array([[5, 6], [7, -100], [8, 9], [-100, -100]], np.int32),
               answer_label=np.array([2, -100, 0, 1], np.int32))

  def task_loss(name):
    task = tasks.get(name)
    return lambda m, batch, key: task.loss(m, batch, key, deterministic=True, config=cfg)

  @jax.jit
  def run(params, batch):
    v = {"params": params}
    key = jax.random.PRNGKey(1)

    def features(m, batch):
      return (m.image_features(m.encode_video(batch["frames"])),
              m.text_features(m.encode_text(batch["text_ids"], batch["text_atts"])),
              m.clamped_temp())

    return (model.apply(v, batch, key, method=task_loss("video_retrieval")),
            model.apply(v, batch, method=features),
            model.apply(v, batch, key, method=task_loss("video_text")),
            model.apply(v, batch, key, method=task_loss("video_qa")),
            model.apply(v, batch, method=video_qa.video_qa_logits))

  retrieval, (video_feat, text_feat, temp), pretrain, qa, logits = jax.device_get(
      run(params, batch))
  assert set(retrieval) == {"itc", "itm"} and set(pretrain) == {"itc", "itm", "mlm"}
  sims = np.asarray(video_feat, np.float64) @ np.asarray(text_feat, np.float64).T / float(temp)
  same = (batch["video_idx"][:, None] == batch["video_idx"][None, :]).astype(np.float64)
  targets = same / same.sum(1, keepdims=True)
  log_softmax = lambda x: x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - x.max(1, keepdims=True)
  itc = -0.5 * (np.mean(np.sum(log_softmax(sims) * targets, 1))
                + np.mean(np.sum(log_softmax(sims.T) * targets, 1)))
  assert float(retrieval["itc"]) == pytest.approx(itc, rel=1e-4)
  assert 0.3 < float(retrieval["itm"]) < 1.5
  # Captions 0 and 1 share a video: with video_idx they are each other's positives.
  assert float(pretrain["itc"]) != pytest.approx(float(retrieval["itc"]), rel=1e-3)
  assert float(pretrain["mlm"]) == pytest.approx(np.log(cfg.model.vocab_size), abs=1.0)
  log_probs = jax.nn.log_softmax(logits)
  expected_qa = -(log_probs[0, 2] + log_probs[2, 0] + log_probs[3, 1]) / 3  # row 1: ignored
  assert float(qa["video_qa"]) == pytest.approx(float(expected_qa), rel=1e-5)


# ---------------------------------------------------------------------------------- evaluation
def test_video_retrieval_and_qa_evaluation_from_the_cli(task_data, tmp_path):
  config = _task_config(task_data)
  model = tasks.build_model(config)
  params = jax.device_get(nn.meta.unbox(
      jax.jit(model.init)(jax.random.PRNGKey(1), *x2vlm.init_inputs(model))["params"]))
  checkpoint.save_params(tmp_path / "params", params)
  workdir = str(tmp_path / "eval")
  results = cli.evaluate(config, workdir, str(tmp_path / "params"))

  # Brute force: every clip and every text through the model at once, every pair scored by ITM.
  data = video_retrieval.load_video_retrieval_eval(
      task_data["msrvtt_test.jsonl"], task_data["root"], FIXTURE_VOCAB, config.data.max_tokens)
  clips = video_examples.load_eval_clips(data["video_paths"], data["where"], num_frames=3,
                                         image_res=32)

  def all_pairs(m, frames, ids, atts):
    vid = m.encode_video(frames)
    txt = m.encode_text(ids, atts)
    n_v, n_t = vid.shape[0], txt.shape[0]
    cross = m.fuse(jnp.repeat(vid, n_t, 0), jnp.ones((n_v * n_t, vid.shape[1]), jnp.int32),
                   jnp.tile(txt, (n_v, 1, 1)), jnp.tile(atts, (n_v, 1)))
    sims = m.image_features(vid) @ m.text_features(txt).T
    return sims, m.itm_logits(cross)[:, 1].reshape(n_v, n_t)

  sims, itm = jax.jit(lambda p, *x: model.apply({"params": p}, *x, method=all_pairs))(
      params, clips, data["text_ids"], data["text_atts"])
  saved = np.load(os.path.join(workdir, "video_retrieval_scores.npz"))
  scores_v2t, scores_t2v = saved[saved.files[0]], saved[saved.files[1]]
  np.testing.assert_allclose(scores_v2t, itm, atol=2e-4)  # k_test 8 >= every row: all re-ranked
  np.testing.assert_allclose(scores_t2v, np.asarray(itm).T, atol=2e-4)
  expected = retrieval_metrics.retrieval_metrics(scores_v2t, scores_t2v, data["img2txt"],
                                                 data["txt2img"])
  itc = retrieval_metrics.retrieval_metrics(np.asarray(sims), np.asarray(sims).T,
                                            data["img2txt"], data["txt2img"])
  for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
    assert results[f"eval/video_retrieval/{key}"] == pytest.approx(expected[key]), key
    assert results[f"eval/video_retrieval/itc_{key}"] == pytest.approx(itc[key]), key
  assert results["eval/video_retrieval/txt_r10"] == 100.0  # 8 texts: always within the top 10

  # Video QA: arg-max of the head; the "purple" question (not in the list) is always wrong.
  answers = json.load(open(task_data["answers"]))
  qa = video_qa.load_video_qa_eval(task_data["qa_test.jsonl"], task_data["root"],
                                   FIXTURE_VOCAB, config.data.max_tokens, answers)
  assert qa["answer_label"].tolist() == [0, 1, 2, -100]
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b, method=video_qa.video_qa_logits))(
      params, dict(frames=video_examples.load_eval_clips(
          qa["video_paths"], qa["where"], num_frames=3, image_res=32), text_ids=qa["text_ids"],
          text_atts=qa["text_atts"]))
  best = np.argmax(np.asarray(logits), axis=1)
  assert results["eval/video_qa/qa_test/acc"] == pytest.approx(
      100.0 * np.mean(best == qa["answer_label"]))
  assert results["eval/video_qa/qa_test/acc"] <= 75.0
  predictions = json.load(open(os.path.join(workdir, "video_qa_qa_test.json")))
  assert [p["prediction"] for p in predictions] == [answers[k] for k in best]
  assert [p["answer"] for p in predictions] == ["red", "blue", "green", "purple"]


def test_evaluators_are_built_once_and_rerun_without_retracing(task_data):
  config = _task_config(task_data)
  model = tasks.build_model(config)
  params = nn.meta.unbox(
      jax.jit(model.init)(jax.random.PRNGKey(1), *x2vlm.init_inputs(model))["params"])
  evaluators = tasks.make_evaluators(config, model)
  first = {name: e.run(params) for name, e in evaluators.items()}
  counts = dict(eval_common.TRACE_COUNTS)
  again = {name: e.run(params) for name, e in evaluators.items()}
  assert again == first
  for fn in ("encode_videos", "encode_texts", "pair_itm", "video_qa_answer_logits"):
    assert eval_common.TRACE_COUNTS[fn] == counts[fn] >= 1, fn


def test_evaluation_names_the_unreadable_video(task_data, tmp_path):
  path = tmp_path / "test.jsonl"
  path.write_text(json.dumps({"video": "v0.mp4", "caption": ["a red video"]}) + "\n"
                  + json.dumps({"video": "nothing.mp4", "caption": ["a red video"]}) + "\n")
  data = video_retrieval.load_video_retrieval_eval(str(path), task_data["root"], FIXTURE_VOCAB,
                                                   12)
  with pytest.raises(video_examples.BadDataError, match=f"{path}:2: video not found: .*nothing"):
    video_examples.load_eval_clips(data["video_paths"], data["where"], num_frames=3, image_res=32)
  # What the evaluators do: name it, keep going, score its rows as misses.
  bad = set()
  clips = video_examples.load_eval_clips(data["video_paths"], data["where"], num_frames=3,
                                         image_res=32, bad=bad, offset=10)
  assert bad == {11} and clips.dtype == np.uint8
  assert (clips[1] == image_ops.MEAN_PIXEL).all() and (clips[0] != image_ops.MEAN_PIXEL).any()
  # An evaluator is refused when it is built, before anything compiles.
  config = _task_config(task_data)
  config.evals.video_retrieval.file = str(path)
  with pytest.raises(video_examples.BadDataError, match=f"{path}:2: no file .*nothing"):
    tasks.make_evaluators(config, tasks.build_model(config))


def test_too_many_frames_for_the_model_fails_before_compiling(task_data):
  config = _task_config(task_data)
  config.data.video_qa.num_frames = 4
  with pytest.raises(ValueError, match="video_qa.num_frames is 4 but the model has 3 frame"):
    tasks.validate(config, training=True)
  with pytest.raises(ValueError, match="video_qa.num_frames is 4 but the model has 3 frame"):
    tasks.make_evaluators(config, tasks.build_model(config))
  config = _task_config(task_data)
  config.data.video_retrieval.num_frames = 5
  with pytest.raises(ValueError, match="video_retrieval.num_frames is 5 but the model has 3"):
    tasks.make_evaluators(config, tasks.build_model(config))
  config.train.tasks = {"video_text": 1.0}
  config.data.video_text.num_frames = 4
  with pytest.raises(ValueError, match="video_text.num_frames is 4 but the model has 3"):
    tasks.validate(config, training=True)


def test_the_answer_head_must_match_the_answer_list(task_data):
  config = _task_config(task_data)
  config.data.video_qa.num_answers = 0
  with pytest.raises(ValueError, match="config.data.video_qa.num_answers is 0"):
    tasks.validate(config, training=False)
  config.data.video_qa.num_answers = 5
  with pytest.raises(ValueError, match="lists 4 answers but config.data.video_qa.num_answers is 5"):
    tasks.validate(config, training=True)
  config.data.video_qa.answer_list = ""
  with pytest.raises(ValueError, match="config.data.video_qa.answer_list is empty"):
    tasks.validate(config, training=True)


def test_init_checkpoint_with_fewer_frames_keeps_its_frame_embeddings(tmp_path):
  pre = tiny.get_config()
  pre.unlock()
  pre.model.num_frames = 2
  shapes = nn.meta.unbox(x2vlm.abstract_variables(x2vlm.build_model(pre.model))["params"])
  rng = np.random.default_rng(0)
  stored = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  checkpoint.save_params(tmp_path / "pre", stored)
  config = tiny.get_config()
  config.unlock()
  config.model.num_frames = 3
  loaded, step = loading.load_params(tasks.build_model(config), str(tmp_path / "pre"))
  assert step == 0
  assert loaded["frame_pos_embed"].shape == (3, 1, 32)
  np.testing.assert_array_equal(loaded["frame_pos_embed"][:2], stored["frame_pos_embed"])
  np.testing.assert_array_equal(loaded["frame_pos_embed"][2], 0.0)
  np.testing.assert_array_equal(loaded["temp"], stored["temp"])
