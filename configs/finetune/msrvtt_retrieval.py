"""MSR-VTT text-video retrieval (1k-A test split) fine-tuning and evaluation, X2-VLM base or large.

The reference fine-tunes it with Retrieval.py (`is_video: True`) but released no config
(REFERENCE_DETAILED.md §4.6, open question 3), so these values are chosen, not copied:
  frames       5 per video (`frame_len` default of the reference's MSR-VTT datasets; stage-2
               pre-training used 3: a 3-frame checkpoint's frame embeddings are copied and the two
               others start at 0, a checkpoint without them (4m) starts them fresh at lr x 2);
               training samples one random frame in each of 5 equal segments, evaluation the
               first frame of each (the reference's `sample_frame_ids`)
  image_res    224, the stage-2 pre-training resolution (no relative-position interpolation)
  the rest     X-VLM's retrieval recipe (§4.1): lr 3e-5, weight decay 0.01, 10% warm-up then
               linear decay, crop scale (0.5, 1), max_tokens 40, 20 clips per GPU on 8 GPUs
               (global 160), 10 epochs, k_test 128 (the reference passes it on the command line)
MSR-VTT 9k training split: 9,000 videos x 20 captions = 180,000 pairs; 10 epochs / 160 per step
= 11,250 steps. Every frame of a clip gets the same crop, flip and RandAugment draw (the reference
augments frames independently; docs/differences_from_reference.md).

  python main.py --config configs/finetune/msrvtt_retrieval.py --workdir runs/msrvtt_ret \
      --config.init.checkpoint=ckpt/x2vlm_base_1b --config.data.vocab_path=bert/vocab.txt
  python main.py --mode eval --config configs/finetune/msrvtt_retrieval.py \
      --checkpoint runs/msrvtt_ret --workdir runs/msrvtt_ret_eval --config.data.vocab_path=...

Records: train `{"video": relpath, "caption": str, "video_id": ...}` (one per caption), test
`{"video": relpath, "caption": [str, ...]}`; a path is a video file, a folder of frames or a
JSON list of base64 frames (x2vlm_jax/data/video.py). arg: `large` selects X2-VLM-large;
`field=value` overrides (`msrvtt_retrieval.py:large,train.seed=1`).
"""
from configs import common

NUM_FRAMES = 5


def video_recipe(arg, *, task: str, file: str):
  """X2-VLM-`size` at 224 px trained on the video `task` with NUM_FRAMES frame embeddings (the
  task adds them: fresh when the checkpoint lacks them, at lr x 2), unlocked, and the parsed arg."""
  arg = common.parse_arg(arg, flags=tuple(common.MODEL_SIZES), file=file)
  config = common.finetune_config(common.size_of(arg), image_res=224, task=task)
  config.model.num_frames = NUM_FRAMES
  config.optim.lr_mult = 2.0
  config.data.max_tokens = config.data.max_words = 40
  section = config.data[task]
  section.num_frames = NUM_FRAMES
  section.sampling = "random_segment"
  section.crop_scale_min = 0.5
  return config, arg


def get_config(arg=None):
  config, arg = video_recipe(arg, task="video_retrieval",
                             file="configs/finetune/msrvtt_retrieval.py")
  v = config.data.video_retrieval
  v.files = ["data/msrvtt/msrvtt_train_9k.jsonl"]
  v.video_root = "data/msrvtt/videos"
  v.batch_size = 160  # per host: one host with 8 GPUs x 20
  t = config.train
  t.total_steps = 11_250
  t.log_every_steps = 100
  t.checkpoint_every_steps = 1_125  # once per epoch
  config.optim.lr = 3e-5
  config.evals.video_retrieval = common.evaluator(
      "video_retrieval", file="data/msrvtt/msrvtt_test_1ka.jsonl", video_root="data/msrvtt/videos",
      k_test=128, batch_size=64)
  return common.finish(config, arg)
