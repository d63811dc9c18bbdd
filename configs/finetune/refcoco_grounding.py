"""RefCOCO / RefCOCO+ / RefCOCOg grounding (box regression from text) fine-tuning and evaluation.

Values of the reference's configs/finetune/refcoco_grounding_large.yaml (REFERENCE_DETAILED.md §4.4):
image_res 384, 20 per GPU (x 8 GPUs here), lr 1e-5, weight decay 0.01, 10 epochs with 10% warm-up,
max_tokens 40; loss L1 + GIoU on the bbox head; training crops keep the box, flips rewrite
"left"/"right"; evaluation Acc@IoU>=0.5 with the RefCOCO "+1 pixel" IoU, per split.
RefCOCO+ train holds 120,191 expressions / 160 = 752 steps per epoch -> 7,520 steps.

  python main.py --config configs/finetune/refcoco_grounding.py --workdir runs/refcoco+ \
      --config.init.checkpoint=ckpt/x2vlm_base_4m --config.data.vocab_path=bert/vocab.txt
  python main.py --mode eval --config configs/finetune/refcoco_grounding.py \
      --checkpoint runs/refcoco+ --workdir runs/refcoco+_eval --config.data.vocab_path=...

Records `{"image": relpath, "text": str, "bbox": [x, y, w, h]}` (COCO pixels; the reference reads
the box from the REFER annotations by ref_id: write it into the record once). `:large` selects
X2-VLM-large (`field=value` overrides too). Reference differences: text/cross drop-path 0.1 is
not implemented.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, flags=tuple(common.MODEL_SIZES),
                         file="configs/finetune/refcoco_grounding.py")
  config = common.finetune_config(common.size_of(arg), image_res=384, task="grounding")
  d = config.data
  d.max_tokens = d.max_words = 40
  g = d.grounding
  g.files = ["data/finetune/refcoco+_train.json"]
  g.image_root = "data/coco"
  g.batch_size = 160  # per host: one host with 8 GPUs = 8 x 20
  g.random_crop = True
  g.randaug = True
  t = config.train
  t.total_steps = 7_520
  t.log_every_steps = 100
  t.checkpoint_every_steps = 752  # once per epoch
  config.optim.lr = 1e-5
  config.evals.grounding = common.evaluator(
      "grounding", files=tuple(f"data/finetune/refcoco+_{split}.json"
                               for split in ("val", "testA", "testB")),
      image_root="data/coco", plus_one=True, batch_size=64)
  return common.finish(config, arg)
