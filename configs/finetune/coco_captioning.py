"""COCO captioning (Karpathy split) as the reference fine-tunes it: UniLM-style MLM generation
(`Captioning_MLM.py`, `XVLMForMLMCaptioning`, REFERENCE_DETAILED.md §4.5).

Training: "[CLS] a picture of <caption> [SEP]" (40 tokens at most); 60% of the caption tokens
(at most 18, whole words, skipgrams) get a [MASK] inserted before them that sees only the
tokens to its left and predicts them, label-smoothed KL loss (0.1). The pre-trained MLM head is
kept (`model.mlm_head`); nothing is new. Evaluation: beam search (3 beams, 5..50 tokens, no
repeated trigrams, length penalty 0) from "[CLS] a picture of", captioning_<split>.json in the
COCO result format, BLEU-4 and CIDEr-D as eval/captioning/<split>/{bleu_4,cider}
(x2vlm_jax/tasks/captioning.py).

Hyper-parameters of configs/finetune/coco_captioning_large.yaml (the only released captioning
config, used for `:large`; the default `:base` takes the same values): image_res 384, 16 images
per GPU (8 GPUs assumed: the reference does not say whether 8 or 16), AdamW lr 5e-6 for the
text stack and 1e-5 for the vision encoder (lr x lr_mult 2 on `vision/`), weight decay 0.01,
5 epochs, 5% warm-up, no clipping. 566,747 training captions / 128 = 4,428 steps per epoch
-> 22,140 steps.

  python main.py --config configs/finetune/coco_captioning.py:large --workdir runs/coco_cap \
      --config.init.checkpoint=ckpt/x2vlm_large_4m --config.data.vocab_path=bert/vocab.txt
  python main.py --mode eval --config configs/finetune/coco_captioning.py:large \
      --checkpoint runs/coco_cap --workdir runs/coco_cap_eval --config.data.vocab_path=...

Records: train `{"image": relpath, "caption": str, "image_id"}` (coco_karpathy_train.json),
test `{"image": relpath, "caption": [references]}` (coco_karpathy_test.json; the image id is the
file name's trailing digits, as the reference's evaluation reads it). `:large` selects
X2-VLM-large (`field=value` overrides too).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, flags=tuple(common.MODEL_SIZES),
                         file="configs/finetune/coco_captioning.py")
  config = common.finetune_config(common.size_of(arg), image_res=384, task="captioning")
  config.model.mlm_head = True  # the captioner generates with the pre-trained MLM head
  config.init.ignore_unexpected = []
  d = config.data
  d.max_tokens = d.max_words = 40
  c = d.captioning
  c.files = ["data/finetune/coco_karpathy/coco_karpathy_train.json"]
  c.image_root = "data/coco"
  c.prompt = "a picture of"
  c.max_tokens, c.mask_prob, c.max_masks = 40, 0.6, 18
  c.batch_size = 128  # per host: one host with 8 GPUs x 16
  c.crop_scale_min = 0.5  # RandomResizedCrop(384, scale=(0.5, 1.0)), flip, RandAugment
  c.hflip_prob = 0.5
  c.randaug = True
  c.label_smoothing = 0.1
  t = config.train
  t.total_steps = 22_140
  t.log_every_steps = 100
  t.checkpoint_every_steps = 4_428  # once per epoch
  o = config.optim
  o.lr = 5e-6
  o.lr_mult = 2.0
  o.new_param_patterns = [r"^vision/"]  # vision_lr 1e-5 = 2 x (text_lr = lr = 5e-6)
  o.weight_decay = 0.01
  o.warmup_steps = 0.05
  config.evals.captioning = common.evaluator(
      "captioning", files=("data/finetune/coco_karpathy/coco_karpathy_test.json",),
      image_root="data/coco", beams=3, max_length=50, min_length=5, length_penalty=0.0,
      batch_size=32)
  return common.finish(config, arg)
