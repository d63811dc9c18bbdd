"""VQA v2 with the generative answer decoder, as the reference fine-tunes it (`XVLMForVQA`).

The question runs through the text and fusion layers with the image; a 6-layer causal BERT
decoder (`model.vqa_decoder_layers`) cross-attends to it and is trained to generate each of the
question's distinct human answers, weighted by their share of the 10 annotations (VG QA answers:
0.5), loss = sum(weight x answer NLL) / questions. The decoder starts as the pre-trained fusion
layers with the text embeddings and MLM head (REFERENCE_DETAILED.md §4.2). Evaluation ranks the
answer list: the 128 answers whose first token is likeliest after `[CLS]` are re-scored by their
full likelihood (`objectives.rank_answers`), written as the official result JSON.

Hyper-parameters from configs/finetune/vqa2_base.yaml: image_res 768 (relative-position tables
interpolated on load), 8 questions per GPU x 8 GPUs per host, lr 4e-5 with every decoder
parameter at lr x 2 (`large_lr_for_dec`), weight decay 0.01, 5 epochs with 10% warm-up,
max_tokens 40, k_test 128; `:large` also as the reference (lr 4e-5, 5% warm-up).

  python main.py --config configs/finetune/vqa.py --workdir runs/vqa \
      --config.init.checkpoint=ckpt/x2vlm_base_4m --config.data.vocab_path=bert/vocab.txt
  python tools/score_vqa.py --predictions runs/vqa/predictions/vqa_vqa_val_eval.json \
      --annotations v2_mscoco_val2014_annotations.json

Records `{"question_id", "image": relpath, "question", "answer": [10 answers] | str}`;
`data.vqa.answer_list` is the candidate list ranked at evaluation.
"""
from configs import common


def get_config(arg=None):
  size = common.size_arg(arg)
  config = common.finetune_config(size, image_res=768)
  config.model.vqa_decoder_layers = config.model.fusion_layers
  d = config.data
  d.max_tokens = d.max_words = 40
  v = d.vqa
  v.files = ["data/finetune/vqa_train.json", "data/finetune/vqa_val.json",
             "data/finetune/vg_qa.json"]
  v.image_root = "data/coco"
  v.answer_list = "data/finetune/answer_list.json"
  v.batch_size = 64  # per host: 8 GPUs x 8
  t = config.train
  t.vqa_generative_weight = 1.0
  t.total_steps = 51_415
  t.log_every_steps = 100
  t.checkpoint_every_steps = 5_000
  o = config.optim
  o.lr = 4e-5
  o.lr_mult = 2.0
  o.new_param_patterns = [r"^answer_decoder/"]
  o.warmup_steps = 0.05 if size == "large" else 0.1
  o.total_steps = t.total_steps
  e = config.eval
  e.vqa_files = ["data/finetune/vqa_val_eval.json"]
  e.vqa_image_root = "data/coco"
  e.vqa_k_test = 128
  e.batch_size = 32
  return common.apply_arg(config, None)
