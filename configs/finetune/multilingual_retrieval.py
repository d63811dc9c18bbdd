"""Multilingual image-text retrieval (Multi30K en/de/fr/cs, multilingual COCO en/ja/zh) with the
multilingual X2-VLM (CCLM): X2-VLM vision + XLM-R text layers + X2-VLM's BERT fusion layers.

Model (REFERENCE_DETAILED.md §1.7, §4.8): XLM-R-base text encoder (12 layers, vocab 250002,
RoBERTa positions from pad id 1, max_position 514, one token type, LayerNorm eps 1e-5) under the
6 BERT fusion layers (eps 1e-12) of X2-VLM-base; `:large` = XLM-R-large (24 layers) under
X2-VLM-large. Tokenizer: XLM-R's sentencepiece model, REQUIRED:
`--config.data.vocab_path=xlm-roberta-base/sentencepiece.bpe.model` (or the directory holding it).

Recipe: CCLM's Retrieval_multi30k_all_ft.yaml (the X2-VLM repo released no multilingual configs):
image_res 384, 20 pairs per GPU on 8 GPUs (global batch 160), lr 3e-5, weight decay 0.01,
10 epochs with 10% warm-up, max_tokens 40, k_test 128. Training on all four Multi30K languages:
4 x 29,000 pairs / 160 = 725 steps per epoch -> 7,250 steps.

  # the CCLM pre-training checkpoint with its untied MLM head (dropped again when fine-tuning);
  # relative-position tables are interpolated 224 -> 384
  x2vlm convert --release cclm_x2vlm_base --from cclm_x2vlm_base.th --output ckpt/cclm_base \
      --vocab xlm-roberta-base/sentencepiece.bpe.model
  python main.py --config configs/finetune/multilingual_retrieval.py --workdir runs/m30k \
      --config.init.checkpoint=ckpt/cclm_base \
      --config.data.retrieval.image_root=/data/flickr30k \
      --config.evals.retrieval.image_root=/data/flickr30k

Records: train `{"image", "caption": str, "image_id"}` (one file per language, as CCLM's
train.<lang>.json); test `{"image", "caption": {"en": [..], "de": [..], ...}}`, one record per
image -> eval/retrieval/<lang>/{txt_r1,...,r_mean} and eval/retrieval/mean/....
arg: `base` (default) or `large`, and `field=value` overrides.
"""
from configs import common

# XLM-R text encoders (the xlm-roberta-{base,large} config.json) on the X2-VLM sizes.
XLMR_TEXT = dict(vocab_size=250002, max_position=514, type_vocab_size=1,
                 text_layer_norm_eps=1e-5, fusion_layer_norm_eps=1e-12,
                 text_position_ids="roberta", text_pad_id=1)
XLMR_TEXT_LAYERS = {"base": 12, "large": 24}


def get_config(arg=None):
  arg = common.parse_arg(arg, flags=tuple(common.MODEL_SIZES),
                         file="configs/finetune/multilingual_retrieval.py")
  size = common.size_of(arg)
  config = common.finetune_config(size, image_res=384, task="retrieval")
  config.model.update(XLMR_TEXT)
  config.model.text_layers = XLMR_TEXT_LAYERS[size]
  d = config.data
  d.vocab_path = ""  # required: XLM-R's sentencepiece.bpe.model (see the module docstring)
  d.max_tokens = d.max_words = 40
  r = d.retrieval
  r.files = ["data/finetune/multi30k/train.en.json", "data/finetune/multi30k/train.de.json",
             "data/finetune/multi30k/train.fr.json", "data/finetune/multi30k/train.cs.json"]
  r.image_root = "data/flickr30k"
  r.batch_size = 160  # per host: one host with 8 GPUs = the reference's 8 x 20
  r.crop_scale_min = 0.5
  r.randaug = True
  t = config.train
  t.total_steps = 7_250
  t.log_every_steps = 50
  t.checkpoint_every_steps = 725  # once per epoch
  config.optim.lr = 3e-5
  config.evals.retrieval = common.evaluator(
      "multilingual_retrieval", file="data/finetune/multi30k/test_2016_flickr.json",
      image_root="data/flickr30k", languages=("en", "de", "fr", "cs"), k_test=128, batch_size=64)
  return common.finish(config, arg)
