"""Video reading (PyAV) and frame sampling: a clip of F frames from a video file or a frame folder.

  read_clip(path, num_frames, sampling, rng)   -> Clip(frames: F x [H, W, 3] uint8, indices [F])
  sample_frame_indices(n, F, sampling, rng, fps) -> [F] frame indices into a clip of n frames
  resolve_path(value, root)                    -> the source path of a record's "video" field

Sources (by what the path is):
  a video file     any container / codec FFmpeg decodes (mp4, webm, mkv, avi, ...). The frame count
                   is the container's (or the number of packets); only the sampled frames are
                   converted to RGB, decoding stops after the last one, and a gap of more than
                   `seek_gap` frames before the next sampled frame is skipped by seeking to the
                   key frame before it (frame numbers then come from the timestamps).
  a directory      pre-extracted frames: its image files (.jpg .jpeg .png .bmp .webp) in natural
                   order (frame_2 before frame_10); only the sampled files are decoded.
  a `.json` file   a JSON list of base64-encoded frames (the reference's MSR-VTT / MSVD format).

Sampling (REFERENCE_DETAILED.md §3.4, `dataset/utils.py::sample_frame_ids`): the n frames are cut
into F contiguous segments, n // F long, the first n % F of them one longer (which ones are longer
is shuffled in training).
  uniform         the first frame of each segment (evaluation; deterministic). n < F: [i % n],
                  sorted (frames repeated).
  random_segment  one random frame inside each segment (training). n < F: all n frames plus
                  F - n random repeats, sorted.
  fps             one frame per second (frame floor(t * fps) for t = 0, 1, 2, ... s), then
                  `uniform` over those (repeats when the clip is shorter than F seconds). Needs the
                  frame rate: the stream's, or `folder_fps` for folders and JSON lists.

Unreadable, empty or too-short sources (fewer than `min_frames` frames) raise `VideoDecodeError`,
a `BadRecordError` naming the file and the reason, so the training pipeline skips and counts the
record like any other bad record.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import fractions
import json
import math
import os
import re
from typing import Sequence

import numpy as np

from x2vlm_jax.data import image_ops
from x2vlm_jax.data import records

SAMPLINGS = ("uniform", "random_segment", "fps")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Seek when the next sampled frame is more than this many frames ahead of the decoder (about 2 s
# of 30 fps video; key frames are usually at most that far apart, so seeking then saves work).
DEFAULT_SEEK_GAP = 64


class VideoDecodeError(records.BadRecordError):
  """The video (file, frame folder or frame list) is missing, unreadable, empty or too short."""


@dataclasses.dataclass
class Clip:
  """The sampled frames of one source, in sampling order."""
  frames: list[np.ndarray]  # F x [H, W, 3] uint8 RGB
  indices: np.ndarray  # [F] int: frame number of each within the source
  num_source_frames: int  # n


# -------------------------------------------------------------------------------------- sampling


def segment_indices(n: int, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
  """The reference's `sample_frame_ids(n, F, training=rng is not None)` (module docstring)."""
  if n < 1 or num_frames < 1:
    raise ValueError(f"cannot sample {num_frames} frames from {n}")
  if n <= num_frames:
    if rng is None:
      idx = np.arange(num_frames) % n
    else:
      idx = np.concatenate([np.arange(n), rng.integers(0, n, num_frames - n)])
    return np.sort(idx).astype(np.int64)
  stride = n // num_frames
  longer = n - num_frames * stride
  offsets = np.array([1] * longer + [0] * (num_frames - longer), np.int64)
  if rng is not None:
    offsets = rng.permutation(offsets)
  lengths = stride + offsets
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  if rng is None:
    return starts
  return starts + rng.integers(0, lengths)


def per_second_indices(n: int, fps: float) -> np.ndarray:
  """Frame floor(t * fps) for t = 0, 1, 2, ... seconds while inside the n frames (at least [0])."""
  if fps <= 0:
    raise ValueError(f"frame rate must be positive, got {fps}")
  seconds = np.arange(int(math.ceil(n / fps)))
  idx = np.unique(np.floor(seconds * fps).astype(np.int64))
  idx = idx[idx < n]
  return idx if len(idx) else np.zeros((1,), np.int64)


def sample_frame_indices(n: int, num_frames: int, sampling: str,
                         rng: np.random.Generator | None = None,
                         fps: float | None = None) -> np.ndarray:
  """[F] frame indices into a clip of `n` frames (module docstring)."""
  if sampling == "uniform":
    return segment_indices(n, num_frames)
  if sampling == "random_segment":
    if rng is None:
      raise ValueError("sampling 'random_segment' needs a random generator")
    return segment_indices(n, num_frames, rng)
  if sampling == "fps":
    if not fps:
      raise ValueError("sampling 'fps' needs the frame rate")
    seconds = per_second_indices(n, fps)
    return seconds[segment_indices(len(seconds), num_frames)]
  raise ValueError(f"unknown frame sampling {sampling!r}: expected one of {SAMPLINGS}")


def eval_sampling(sampling: str) -> str:
  """The deterministic sampling used at evaluation for a training `sampling`."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"unknown frame sampling {sampling!r}: expected one of {SAMPLINGS}")
  return "fps" if sampling == "fps" else "uniform"


# -------------------------------------------------------------------------------------- sources


def resolve_path(value, root: str) -> str:
  """A record's video field -> path (relative paths are joined to `root`)."""
  if not isinstance(value, str) or not value:
    raise records.BadRecordError(f"video is not a path string: {value!r:.80}")
  return value if os.path.isabs(value) or not root else os.path.join(root, value)


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: str) -> list[str]:
  """The image files of a frame folder in natural order."""
  names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_SUFFIXES)
           and os.path.isfile(os.path.join(folder, n))]
  return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _decode_still(source, what: str) -> np.ndarray:
  try:
    return np.asarray(image_ops.decode_image(source, exif_transpose=False))
  except image_ops.ImageDecodeError as e:
    raise VideoDecodeError(f"{what}: {e}") from e


def _check_length(n: int, min_frames: int, path: str) -> None:
  if n == 0:
    raise VideoDecodeError(f"video {path} has no frames")
  if n < min_frames:
    raise VideoDecodeError(f"video {path} has {n} frames, fewer than min_frames={min_frames}")


def _read_stills(path: str, n: int, load, num_frames: int, sampling: str, rng, min_frames: int,
                 fps: float) -> Clip:
  _check_length(n, min_frames, path)
  indices = sample_frame_indices(n, num_frames, sampling, rng, fps)
  cache = {int(k): load(int(k)) for k in np.unique(indices)}
  return Clip([cache[int(k)] for k in indices], indices, n)


def _read_folder(path, num_frames, sampling, rng, min_frames, fps) -> Clip:
  files = frame_files(path)
  return _read_stills(path, len(files), lambda k: _decode_still(files[k], f"frame {files[k]}"),
                      num_frames, sampling, rng, min_frames, fps)


def _read_b64_list(path, num_frames, sampling, rng, min_frames, fps) -> Clip:
  try:
    with open(path) as f:
      frames = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise VideoDecodeError(f"cannot read frame list {path}: {e}") from e
  if not isinstance(frames, list) or not all(isinstance(v, str) for v in frames):
    raise VideoDecodeError(f"{path}: expected a JSON list of base64-encoded frames")

  def load(k):
    try:
      data = base64.b64decode(frames[k], validate=True)
    except (binascii.Error, ValueError) as e:
      raise VideoDecodeError(f"{path}: frame {k} is not valid base64 ({e})") from e
    return _decode_still(data, f"{path}: frame {k}")

  return _read_stills(path, len(frames), load, num_frames, sampling, rng, min_frames, fps)


class _NoTimestamps(Exception):
  """A decoded frame has no pts: frame numbers must be counted, without seeking."""


def _open_video(path: str):
  import av  # pylint: disable=g-import-not-at-top

  try:
    container = av.open(path)
  except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise VideoDecodeError(f"cannot open video {path}: {type(e).__name__}: {e}") from e
  if not container.streams.video:
    container.close()
    raise VideoDecodeError(f"{path} has no video stream")
  stream = container.streams.video[0]
  stream.thread_type = "AUTO"
  return container, stream


def _video_info(path: str) -> tuple[int, fractions.Fraction | None]:
  """(number of frames, frame rate or None) of the first video stream."""
  container, stream = _open_video(path)
  with container:
    rate = stream.average_rate or stream.guessed_rate
    n = int(stream.frames or 0)
    if n <= 0:  # not in the header (webm, mkv, ...): count the stream's packets
      n = sum(1 for packet in container.demux(stream) if packet.size)
  return n, (fractions.Fraction(rate) if rate else None)


def _decode_targets(path: str, targets: Sequence[int], rate, seek_gap: int | None
                    ) -> tuple[dict[int, np.ndarray], int | None]:
  """Decodes the frames numbered `targets` (sorted, unique).

  Frames are numbered by counting from the first one; after a seek, by their timestamp (offset so
  that the first frame's timestamp number is 0). A target falling between two timestamps gets the
  first frame at or after it. Returns (frames, None), or, when the stream ended before the last
  target, (what was decoded, the number of frames the stream really has).
  """
  container, stream = _open_video(path)
  out: dict[int, np.ndarray] = {}
  with container:
    time_base, start = stream.time_base, stream.start_time or 0
    timed = rate is not None and time_base is not None
    offset = None  # timestamp number of frame 0
    decoder = container.decode(stream)
    counted, seeked, next_idx, last_idx, k = 0, False, 0, -1, 0
    sought = -1  # the last target sought (each target at most once)
    while k < len(targets):
      target = targets[k]
      if (timed and seek_gap is not None and offset is not None and target > sought
          and target - next_idx > seek_gap):
        pts = start + int(math.floor((target + offset) / rate / time_base))
        container.seek(pts, stream=stream, backward=True, any_frame=False)
        decoder = container.decode(stream)
        seeked, sought = True, target
      frame = next(decoder, None)
      if frame is None:
        break
      if timed and frame.pts is not None:
        number = int(round(float((frame.pts - start) * time_base * rate)))
        if offset is None:
          offset = number
        idx = number - offset if seeked else counted
      elif seeked:
        raise _NoTimestamps()
      else:
        idx = counted
      counted += 1
      next_idx, last_idx = idx + 1, max(last_idx, idx)
      if k < len(targets) and targets[k] <= idx:
        rgb = frame.to_ndarray(format="rgb24")
        while k < len(targets) and targets[k] <= idx:
          out[targets[k]] = rgb
          k += 1
  return out, (None if k == len(targets) else last_idx + 1)


def _read_video(path, num_frames, sampling, rng, min_frames, seek_gap) -> Clip:
  import av  # pylint: disable=g-import-not-at-top

  try:
    n, rate = _video_info(path)
    _check_length(n, min_frames, path)
    if sampling == "fps" and rate is None:
      raise VideoDecodeError(f"video {path} has no frame rate (sampling 'fps')")
    fps = float(rate) if rate else None
    indices = sample_frame_indices(n, num_frames, sampling, rng, fps)
    try:
      frames, short = _decode_targets(path, sorted(set(indices.tolist())), rate, seek_gap)
    except _NoTimestamps:
      frames, short = _decode_targets(path, sorted(set(indices.tolist())), rate, None)
    if short is not None:  # the header promised more frames than the stream holds
      n = short
      _check_length(n, min_frames, path)
      indices = sample_frame_indices(n, num_frames, sampling, rng, fps)
      frames, short = _decode_targets(path, sorted(set(indices.tolist())), rate, None)
      if short is not None:
        raise VideoDecodeError(f"video {path}: decoding stopped early twice ({short} frames)")
  except av.FFmpegError as e:
    raise VideoDecodeError(f"cannot decode video {path}: {type(e).__name__}: {e}") from e
  return Clip([frames[int(k)] for k in indices], indices, n)


def read_clip(path: str, num_frames: int, sampling: str, rng: np.random.Generator | None = None,
              *, min_frames: int = 1, folder_fps: float = 1.0,
              seek_gap: int | None = DEFAULT_SEEK_GAP) -> Clip:
  """F frames of the video / frame folder / base64 frame list at `path` (module docstring).

  Args:
    path: the source. num_frames: F. sampling: one of SAMPLINGS (random_segment uses `rng`).
    min_frames: sources with fewer frames raise VideoDecodeError (shorter ones repeat frames).
    folder_fps: frame rate of folders and JSON lists (only `fps` sampling reads it).
    seek_gap: seek when the next sampled frame is further ahead than this; None never seeks.
  Raises:
    VideoDecodeError naming `path`: missing, empty, unreadable, too short.
  """
  if sampling not in SAMPLINGS:
    raise ValueError(f"unknown frame sampling {sampling!r}: expected one of {SAMPLINGS}")
  if not os.path.exists(path):
    raise VideoDecodeError(f"video not found: {path}")
  if os.path.isdir(path):
    return _read_folder(path, num_frames, sampling, rng, min_frames, folder_fps)
  if os.path.getsize(path) == 0:
    raise VideoDecodeError(f"video file is empty (0 bytes): {path}")
  if path.lower().endswith(".json"):
    return _read_b64_list(path, num_frames, sampling, rng, min_frames, folder_fps)
  return _read_video(path, num_frames, sampling, rng, min_frames, seek_gap)


def eval_transform(clip: Clip, image_res: int) -> np.ndarray:
  """Evaluation transform of every frame: bicubic resize to R x R -> [F, R, R, 3] uint8 (CLIP
  normalisation happens on the device, in `X2VLM.encode_video`, as for evaluation images)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  return np.stack([np.asarray(image_ops.resize_square(Image.fromarray(f), image_res), np.uint8)
                   for f in clip.frames])
