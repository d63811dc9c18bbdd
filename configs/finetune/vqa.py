"""VQA v2 with the generative answer decoder, as the reference fine-tunes it (`XVLMForVQA`).

The question runs through the text and fusion layers with the image; a causal BERT decoder as deep
as the fusion stack (6 layers; added by the task, x2vlm_jax/tasks/vqa_generative.py) cross-attends
to it and is trained to generate each of the question's distinct human answers, weighted by their
share of the 10 annotations (VG QA answers: 0.5), loss = sum(weight x answer NLL) / questions. The
decoder starts as the pre-trained fusion layers with the text embeddings and MLM head
(REFERENCE_DETAILED.md §4.2). Evaluation ranks the answer list: the 128 answers whose first token
is likeliest after `[CLS]` are re-scored by their full likelihood (`vqa_generative.rank_answers`),
written as the official result JSON.

Hyper-parameters from configs/finetune/vqa2_base.yaml: image_res 768 (relative-position tables
interpolated on load), 8 questions per GPU x 8 GPUs per host, lr 4e-5 with every decoder
parameter at lr x 2 (`large_lr_for_dec`), weight decay 0.01, 5 epochs with 10% warm-up,
max_tokens 40, k_test 128; `:large` also as the reference (lr 4e-5, 5% warm-up).

  python main.py --config configs/finetune/vqa.py --workdir runs/vqa \
      --config.init.checkpoint=ckpt/x2vlm_base_4m --config.data.vocab_path=bert/vocab.txt
  python tools/score_vqa.py --predictions runs/vqa/vqa_vqa_val_eval.json \
      --annotations v2_mscoco_val2014_annotations.json

Records `{"question_id", "image": relpath, "question", "answer": [10 answers] | str}`;
`data.vqa_generative.answer_list` is the candidate list ranked at evaluation. arg: `large`
selects X2-VLM-large; `field=value` overrides.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, flags=tuple(common.MODEL_SIZES), file="configs/finetune/vqa.py")
  size = common.size_of(arg)
  config = common.finetune_config(size, image_res=768, task="vqa_generative")
  d = config.data
  d.max_tokens = d.max_words = 40
  v = d.vqa_generative
  v.files = ["data/finetune/vqa_train.json", "data/finetune/vqa_val.json",
             "data/finetune/vg_qa.json"]
  v.image_root = "data/coco"
  v.answer_list = "data/finetune/answer_list.json"
  v.batch_size = 64  # per host: 8 GPUs x 8
  t = config.train
  t.total_steps = 51_415
  t.log_every_steps = 100
  t.checkpoint_every_steps = 5_000
  o = config.optim
  o.lr = 4e-5
  o.lr_mult = 2.0  # the answer decoder (the task's new parameters)
  o.warmup_steps = 0.05 if size == "large" else 0.1
  config.evals.vqa = common.evaluator(
      "vqa_generative", files=("data/finetune/vqa_val_eval.json",), image_root="data/coco",
      k_test=128, batch_size=32)
  return common.finish(config, arg)
