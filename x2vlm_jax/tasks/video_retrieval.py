"""Text-video retrieval (MSR-VTT; the reference's `Retrieval.py` with `is_video: True`).

Fine-tuning: video-text batches (records, example, batch and transform as `video_text`,
fine-tuning crop scale 0.5) -> {itc, itm}; captions of the same video (equal `video_idx`, from
"video_id" or the path) share the ITC target mass and are never sampled as each other's ITM
negatives. No MLM. Adds the frame embedding (`frame_pos_embed`, fresh when the init checkpoint
lacks it, lr x lr_mult); a stored one for fewer frames keeps its frames (models/loading.py).

Evaluator type "video_retrieval" (REFERENCE_DETAILED §4.6): `{"video", "caption": [..]}` records
(MSR-VTT 1k-A), videos under `video_root`, frames as `config.data.video_retrieval` says
(num_frames; "uniform" sampling, or "fps" when training samples by fps; frame_folder_fps). Every
video goes through `X2VLM.encode_video` once, every text through the text encoder; then the
image-retrieval engine (`evaluate/retrieval.py`): ITC similarities, top-`k_test` ITM re-ranking
by the raw class-1 logit, "image" = video -> eval/<name>/{txt_r1, txt_r5, txt_r10 (video ->
text), img_r1, ..., img_r10 (text -> video), r_mean} and itc_* (ITC alone); files
<name>_rankings.json and, with `save_scores`, <name>_scores.npz.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from x2vlm_jax.data import eval_data
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.data import video as video_lib
from x2vlm_jax.data import video_examples
from x2vlm_jax.evaluate import common
from x2vlm_jax.evaluate import retrieval as engine
from x2vlm_jax.evaluate import video as video_eval
from x2vlm_jax.tasks import base, video_text

BadDataError = eval_data.BadDataError
FRAME_EMBEDDING_PATTERN = r"(^|/)frame_pos_embed$"


# ------------------------------------------------------------------------------ evaluation
def load_video_retrieval_eval(path: str, video_root: str, tokenizer, max_tokens: int, *,
                              max_words: int | None = None, video_key: str = "video") -> dict:
  """`{"video", "caption": str | [str, ...]}` records -> dict(video_paths [N], where [N],
  text_ids / text_atts [T, L] i32, txt2img [T] i32 (the video of each text), img2txt: N lists of
  text indices); every video's captions, in order. A bad record fails naming it."""
  recs = eval_data.read_split(path, "videos")
  texts, text_where, txt2img, img2txt = [], [], [], []
  for n, (where, rec) in enumerate(recs):
    caps = rec.get("caption")
    caps = [caps] if isinstance(caps, str) else caps
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
      raise BadDataError(f"{where}: 'caption' must be a string or a non-empty list of strings")
    img2txt.append(list(range(len(texts), len(texts) + len(caps))))
    texts.extend(caps)
    text_where.extend([where] * len(caps))
    txt2img.extend([n] * len(caps))
  text_ids, text_atts = eval_data.encode_texts(
      texts, text_where, eval_data.as_tokenizer(tokenizer), max_tokens,
      max_tokens if max_words is None else max_words)
  return dict(video_paths=video_examples.video_paths(recs, video_key, video_root),
              where=[w for w, _ in recs], text_ids=text_ids, text_atts=text_atts,
              txt2img=np.asarray(txt2img, np.int32), img2txt=img2txt)


def evaluate_video_retrieval(model, params, data: dict, *, num_frames: int, image_res: int,
                             k_test: int, batch_size: int, sampling: str = "uniform",
                             folder_fps: float = 1.0, mesh=None, include_itc: bool = False,
                             log_fn: Callable[[str], Any] = logging.info,
                             fns: dict | None = None, encode_videos: Callable | None = None
                             ) -> engine.RetrievalResult:
  """Video-text retrieval of `data` (`load_video_retrieval_eval`; module docstring).

  fns / encode_videos: `engine.make_retrieval_fns(model, mesh)` and
  `video_eval.make_video_encoder(model)` made once by the caller (default: made here).
  Returns an `engine.RetrievalResult` as `engine.evaluate_retrieval` does ("image" = video:
  txt_r*: video -> text, img_r*: text -> video).
  """
  common.check_batch_size(batch_size, mesh)
  params = common.place_params(params, mesh)
  fns = fns or engine.make_retrieval_fns(model, mesh)
  encode_videos = encode_videos or video_eval.make_video_encoder(model)
  t0 = time.monotonic()
  bad: set[int] = set()  # unreadable videos: named in warnings, their rows misses
  video_embeds, video_feat = video_eval.run_over_videos(
      encode_videos, params, data["video_paths"], data["where"], batch_size=batch_size,
      num_frames=num_frames, image_res=image_res, sampling=sampling, folder_fps=folder_fps,
      mesh=mesh, name="video retrieval", log_fn=log_fn, bad=bad)
  bad_mask = np.zeros(len(data["video_paths"]), bool)
  bad_mask[sorted(bad)] = True
  text_embeds, text_feat, text_atts = engine.encode_texts(
      params, data["text_ids"], data["text_atts"], batch_size=batch_size, fns=fns, mesh=mesh)
  log_fn(f"video retrieval: encoded {len(data['video_paths'])} videos and "
         f"{len(data['text_ids'])} texts in {time.monotonic() - t0:.1f}s")
  emb = dict(image_embeds=video_embeds, image_feat=video_feat, text_embeds=text_embeds,
             text_feat=text_feat, text_atts=text_atts)
  result = engine.rerank_and_score(
      params, emb, data["img2txt"], data["txt2img"], k_test=k_test, batch_size=batch_size,
      fns=fns, mesh=mesh, include_itc=include_itc, log_fn=log_fn, bad_images=bad_mask)
  log_fn(f"video retrieval: done in {time.monotonic() - t0:.1f}s, "
         f"r_mean {result.metrics['r_mean']:.2f}")
  return result


class VideoRetrievalEvaluator(common.Evaluator):
  """Text-video retrieval: ITC similarities, top-k ITM re-ranking both ways (module docstring)."""

  TYPE = "video_retrieval"

  @classmethod
  def default_config(cls):
    cfg = super().default_config()
    cfg.update(dict(
        file="",  # {"video", "caption": [..]} records (MSR-VTT 1k-A)
        video_root="",  # relative video paths are joined to this
        k_test=128,  # ITM re-ranking depth per row
        embed_dtype="float32",  # storage of the embeddings the re-ranking reads (or bfloat16)
        save_scores=False,  # also write the full score matrices (<name>_scores.npz)
        scores_dtype="float32",  # ... as float32 or float16
    ))
    return cfg

  def __init__(self, name, cfg, *, config, model, mesh=None):
    super().__init__(name, cfg, config=config, model=model, mesh=mesh)
    if not cfg.file:
      raise ValueError(f"{self.field('file')} is empty: name the evaluation records")
    d, section = config.data, config.data[TASK.name]
    video_examples.check_num_frames(section.num_frames, config.model, TASK.field("num_frames"))
    self.section = section
    self.data = load_video_retrieval_eval(
        cfg.file, cfg.video_root, text_lib.load_tokenizer(d.vocab_path), d.max_tokens,
        max_words=d.max_words, video_key=section.video_key)
    eval_data.check_files_exist(self.data["video_paths"], self.data["where"])
    self.fns = engine.make_retrieval_fns(model, mesh, cfg.embed_dtype)
    self.encode_videos = video_eval.make_video_encoder(model)

  def run(self, params, step=0, *, predictions_dir=None):
    s = self.section
    result = evaluate_video_retrieval(
        self.model, params, self.data, num_frames=s.num_frames,
        image_res=self.config.model.image_res, k_test=self.cfg.k_test,
        batch_size=self.batch_size, sampling=video_lib.eval_sampling(s.sampling),
        folder_fps=s.frame_folder_fps, mesh=self.mesh, include_itc=True, log_fn=self.log,
        fns=self.fns, encode_videos=self.encode_videos)
    engine.write_outputs(predictions_dir, self.name, result, save_scores=self.cfg.save_scores,
                         scores_dtype=self.cfg.scores_dtype)
    return {self.metric_name(k): v for k, v in result.metrics.items()}


# ------------------------------------------------------------------------------ the task
class VideoRetrievalTask(base.Task):
  """See the module docstring."""

  name = "video_retrieval"
  loss_terms = ("itc", "itm")
  new_params = (FRAME_EMBEDDING_PATTERN,)
  allow_missing = ("frame_pos_embed",)
  evaluators = {VideoRetrievalEvaluator.TYPE: VideoRetrievalEvaluator}

  def config(self):
    return video_text.video_text_section()  # fine-tuning crop: RandomResizedCrop(scale 0.5..1)

  def validate(self, config):
    super().validate(config)
    video_examples.check_num_frames(self.section(config).num_frames, config.model,
                                    self.field("num_frames"))

  def processor(self, config, tokenizer):
    return video_text.video_text_processor(self, config, tokenizer)

  def collate(self, config):
    return video_examples.collate_video_text

  def loss(self, m, batch, rng, *, deterministic, config):
    return video_text.video_text_loss(m, batch, rng, deterministic=deterministic, config=config,
                                      with_mlm=False)


TASK = VideoRetrievalTask()
