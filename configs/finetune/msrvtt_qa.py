"""MSRVTT-QA as 1,500-way classification (the CLIPBERT setting of the reference's VQA_msrvtt.py,
`XVLMForClassification`), X2-VLM base or large.

The fused [CLS] of (question, video) goes through the classification head `vqa_head` (one logit
per answer of `train_ans2label.json`), softmax cross-entropy; questions whose answer is not among
the 1,500 are ignored in training and counted wrong at test, as in the reference. The reference
released no hyper-parameters (REFERENCE_DETAILED.md §4.7, open question 3); chosen here:
  frames     5 (`frame_len` default of the reference's `msrvtt_qa_dataset`), random frame per
             segment in training, first frame of each segment at test; one crop, flip decision and
             RandAugment draw per clip, never flipped when the question or answer says
             "left"/"right" (the reference's careful flip)
  image_res  224 (stage-2 pre-training resolution)
  the rest   X2-VLM's VQA classification recipe (configs/finetune/vqa_classification.py): lr 4e-5
             with the new head (and new frame embeddings) at lr x 2, weight decay 0.01, 10%
             warm-up then linear decay, 8 questions per GPU on 8 GPUs, 5 epochs, max_tokens 40
MSRVTT-QA train holds 158,581 questions: 5 epochs / 64 per step = 12,389 steps.

  python main.py --config configs/finetune/msrvtt_qa.py --workdir runs/msrvtt_qa \
      --config.init.checkpoint=ckpt/x2vlm_base_1b --config.data.vocab_path=bert/vocab.txt
  python main.py --mode eval --config configs/finetune/msrvtt_qa.py --checkpoint runs/msrvtt_qa \
      --workdir runs/msrvtt_qa_eval --config.data.vocab_path=...

Records `{"video": relpath, "question", "answer"}` (the reference's `{"video_id": "video123", ...}`
becomes `"video": "video123.mp4"`, or a frame folder / base64 frame list); the answer list is the
reference's `{answer: label}` file or a JSON list. arg: `large` selects X2-VLM-large;
`field=value` overrides.
"""
from configs import common
from configs.finetune import msrvtt_retrieval


def get_config(arg=None):
  config, arg = msrvtt_retrieval.video_recipe(arg, task="video_qa",
                                              file="configs/finetune/msrvtt_qa.py")
  q = config.data.video_qa
  q.files = ["data/msrvtt_qa/train.jsonl"]
  q.video_root = "data/msrvtt/videos"
  q.answer_list = "data/msrvtt_qa/train_ans2label.json"
  q.num_answers = 1500  # = len(answer_list), checked at start-up
  q.batch_size = 64  # per host: 8 GPUs x 8
  t = config.train
  t.total_steps = 12_389
  t.log_every_steps = 100
  t.checkpoint_every_steps = 2_478  # once per epoch
  config.optim.lr = 4e-5
  config.evals.video_qa = common.evaluator(
      "video_qa", files=("data/msrvtt_qa/test.jsonl",), video_root="data/msrvtt/videos",
      batch_size=64)
  return common.finish(config, arg)
