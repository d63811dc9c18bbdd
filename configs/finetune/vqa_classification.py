"""VQA v2 as classification over a fixed answer list (the reference's `XVLMForVQAClassification`).

A cheaper alternative to the reference's generative answer decoder (REFERENCE_DETAILED.md §4.2):
the fused [CLS] of (image, question) goes through a new MLP head with one logit per candidate
answer (the 3,129 answers of the standard list), trained with soft-target binary cross-entropy
(target of an answer = min(1, #annotators who gave it / 3), its VQA accuracy) and evaluated by
arg-max, written as the official result JSON. Hyper-parameters from the reference's
configs/finetune/vqa2_base.yaml: image_res 768 (relative-position tables interpolated on load),
8 questions per GPU x 8 GPUs per host, lr 4e-5 with the new head at lr x 2, weight decay 0.01,
5 epochs with 10% warm-up, max_tokens 40. VQA v2 train + val hold 658,111 questions (VG QA may be
appended to the file list): 5 epochs / 64 per step = 51,415 steps on one host.

  python main.py --config configs/finetune/vqa_classification.py --workdir runs/vqa \
      --config.init.checkpoint=ckpt/x2vlm_base_4m --config.data.vocab_path=bert/vocab.txt
  python main.py --mode eval --config configs/finetune/vqa_classification.py \
      --checkpoint runs/vqa --workdir runs/vqa_eval --config.data.vocab_path=...
  python tools/score_vqa.py --predictions runs/vqa_eval/vqa_vqa_val_eval.json \
      --annotations v2_mscoco_val2014_annotations.json

Records `{"question_id", "image": relpath, "question", "answer": [10 answers] | str}`. arg:
`large` selects X2-VLM-large; `field=value` overrides.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, flags=tuple(common.MODEL_SIZES),
                         file="configs/finetune/vqa_classification.py")
  config = common.finetune_config(common.size_of(arg), image_res=768, task="vqa")
  d = config.data
  d.max_tokens = d.max_words = 40
  v = d.vqa
  v.files = ["data/finetune/vqa_train.json", "data/finetune/vqa_val.json"]
  v.image_root = "data/coco"
  v.answer_list = "data/finetune/answer_list.json"
  v.num_answers = 3129  # = len(answer_list), checked at start-up
  v.batch_size = 64  # per host: 8 GPUs x 8
  t = config.train
  t.total_steps = 51_415
  t.log_every_steps = 100
  t.checkpoint_every_steps = 5_000
  o = config.optim
  o.lr = 4e-5
  o.lr_mult = 2.0  # the new head
  config.evals.vqa = common.evaluator(
      "vqa", files=("data/finetune/vqa_val_eval.json",), image_root="data/coco", batch_size=64)
  return common.finish(config, arg)
