"""Video evaluation, the task-free pieces: the jitted video encoder and a batched runner over
videos (the evaluators using them live with their tasks, x2vlm_jax/tasks/video_*.py).

Videos are read from disk one batch at a time (deterministic frame sampling, test transform:
resize to R x R, uint8 until the device: `data.video_examples.load_eval_clips`), the next batch
decoded by a thread while the device runs the current one.

  make_video_encoder(model)   jit(params, frames [B, F, R, R, 3]) -> (video embeds, features)
  run_over_videos(fn, params, paths, where, extra, ...)   fn over fixed-size batches of videos
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax.data import video_examples
from x2vlm_jax.evaluate import common

Mesh = jax.sharding.Mesh


def make_video_encoder(model) -> Callable[..., Any]:
  """jit(params, frames [B, F, R, R, 3]) -> (video_embeds [B, 1+N, D], video_feat [B, E]):
  every frame through the ViT, the frame embedding added, the mean over frames
  (`X2VLM.encode_video`), then the ITC projection."""

  def encode_videos(params, frames):
    common.TRACE_COUNTS["encode_videos"] += 1

    def f(m, x):
      embeds = m.encode_video(x)
      return embeds, m.image_features(embeds)

    return model.apply({"params": params}, frames, method=f)

  return jax.jit(encode_videos)


def run_over_videos(fn: Callable[..., Any], params, paths: Sequence[str], where: Sequence[str],
                    extra: tuple[np.ndarray, ...] = (), *, batch_size: int, num_frames: int,
                    image_res: int, sampling: str = "uniform", folder_fps: float = 1.0,
                    mesh: Mesh | None = None, name: str = "video",
                    log_fn: Callable[[str], Any] = logging.info,
                    bad: set[int] | None = None) -> Any:
  """`fn(params, frames [B, F, R, R, 3], *extra_batches)` over fixed-size batches of the videos
  `paths` (records `where`; the last batch padded by repeating its last row); `extra` arrays
  [N, ...] are batched alongside. Returns the outputs (a pytree of device arrays with leading
  dim N, padding dropped), concatenated on device. With a `bad` set, an unreadable video is named
  in a warning and its index added to `bad` (its clip is zeros) instead of failing."""
  common.check_batch_size(batch_size, mesh)
  put = lambda a: common.put_batch(common.pad_rows(a, batch_size), mesh)
  n = len(paths)
  if n == 0:
    raise ValueError("nothing to evaluate: no videos")
  starts = list(range(0, n, batch_size))

  def load(start):
    stop = min(n, start + batch_size)
    return video_examples.load_eval_clips(
        paths[start:stop], where[start:stop], num_frames=num_frames, image_res=image_res,
        sampling=sampling, folder_fps=folder_fps, bad=bad, offset=start)

  outs, t0 = [], time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(1) as prefetch:
    pending = prefetch.submit(load, starts[0])
    for b, start in enumerate(starts):
      frames = pending.result()
      if b + 1 < len(starts):
        pending = prefetch.submit(load, starts[b + 1])
      stop = start + len(frames)
      out = fn(params, put(frames), *[put(np.asarray(a[start:stop])) for a in extra])
      if stop - start < batch_size:
        out = jax.tree.map(lambda y, m=stop - start: y[:m], out)
      outs.append(out)
      if b % 50 == 0 or b + 1 == len(starts):
        log_fn(f"{name}: {stop}/{n} videos ({stop / max(time.monotonic() - t0, 1e-9):.1f}/s)")
  if len(outs) == 1:
    return outs[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)
