"""The demo that learns on a CPU: a small X2-VLM trained from scratch on synthetic "shapes" scenes.

  python main.py --config configs/demo.py --workdir runs/demo

Loading this config writes the dataset to `demo_data/` if it is not there yet
(x2vlm_jax/data/demo.py; `tools/make_demo_data.py` writes one anywhere). The run pre-trains with
image-text + region batches (ITC, ITM, MLM, box L1 + GIoU) and ends with a zero-shot evaluation on
the 100 validation scenes: image->text / text->image R@1 (chance 1%) and grounding Acc@IoU>=0.5,
then zero-shot classification of their shapes (18 classes), OVAD attribute mAP of their boxes and
Winoground-style groups, written to runs/demo/metrics.jsonl.

arg (`configs/demo.py:quick,data_dir=PATH,train.seed=1`): `quick` shrinks it to a smoke run (the
tests), `no_eval` drops the evaluation, `data_dir=PATH` puts the data elsewhere (default
demo_data), and any `field=value` overrides a config field.
"""
from configs import common
from x2vlm_jax.data import demo as demo_data


def get_config(arg=None):
  arg = common.parse_arg(arg, flags=("quick", "no_eval"), options={"data_dir": "demo_data"},
                         file="configs/demo.py")
  quick = "quick" in arg.flags
  data_dir = arg.options["data_dir"] or "demo_data"
  demo_data.ensure_demo_data(data_dir, num_train=120 if quick else 2000,
                             num_val=12 if quick else 100, image_size=96, seed=0)
  config = common.base_config()

  m = config.model
  m.image_res, m.patch_size = 96, 16
  m.vision_width, m.vision_depth, m.vision_heads, m.vision_mlp_dim = 128, 3, 4, 256
  m.text_width, m.text_heads, m.text_mlp_dim = 128, 4, 256
  # One fusion layer: the fusion layers run on 3x the texts for ITM plus MLM and boxes, over half the
  # step with two; the time saved buys 1300 steps instead of 1000 in the same wall time (README).
  m.text_layers, m.fusion_layers = 2, 1
  m.vocab_size, m.max_position = 160, 32  # demo vocab.txt has < 160 tokens (checked at start)
  m.embed_dim = 64
  m.drop_path_rate, m.hidden_dropout, m.attention_dropout = 0.0, 0.0, 0.0
  m.vision_abs_pos_emb = True  # from scratch, boxes need absolute positions (BEiT-2 weights have
  # learned them through their relative tables; a 3-block random ViT has not)
  # A learned table that starts as 2-D sine-cosine row/column codes: grounding Acc@0.5 61.0 in 1000
  # steps, against 17.0 from a random (std 0.5) table and 51.5 from the fixed sine-cosine table
  # (docs/demo.md). At BEiT's std 0.02 the box head ignores the image.
  m.vision_pos_emb_kind = "learned_from_sincos2d"
  # A convolutional stem (four 3x3 stride-2 convs) instead of the 16x16 linear patch embedding:
  # an object here is one or two patches wide and the linear embedding learns its shape too slowly
  # for this budget (the model told scenes apart by colour only). Text->image R@1 31.7 / 28.7 /
  # 31.3 over seeds 0 / 1 / 2 against 26.7 / 25.0 (seeds 0 / 1), grounding 77.5 / 80.0 / 76.5
  # against 52.5 / 52.0, in the same time (docs/demo.md).
  m.vision_stem = "conv"
  if quick:
    m.vision_width, m.vision_depth, m.vision_mlp_dim = 32, 1, 64
    m.text_width, m.text_mlp_dim, m.text_layers, m.fusion_layers = 32, 64, 1, 1
    m.embed_dim = 16

  d = config.data
  d.vocab_path = f"{data_dir}/vocab.txt"
  d.max_tokens = d.max_words = 16
  # The reference's mask probability: MLM on "a red [MASK] left of ..." asks for an object's shape,
  # which is what this model is slowest to see (it tells scenes apart by colour; docs/demo.md);
  # 0.25 reached text->image R@1 18.7 / 20.7, 0.5 24.7.
  d.max_masks = 6
  d.mask_prob = 0.5
  d.read_threads = 2
  it = d.image_text
  it.files = [f"{data_dir}/train_image_text.jsonl"]
  it.image_root = data_dir
  it.batch_size = 8 if quick else 32
  it.crop_scale_min = 0.8  # the scenes are small: keep most of each image
  it.randaug = False
  r = d.regions
  r.files = [f"{data_dir}/train_regions.jsonl"]
  r.image_root = data_dir
  r.max_images = 8 if quick else 16
  r.batch_size = 8 if quick else 32
  r.max_regions = 3
  r.randaug = False
  r.random_crop = False  # evaluation sees whole scenes; train boxes at the same scale

  t = config.train
  t.tasks = {"image_text": 1.0, "regions": 1.0}
  t.total_steps = 6 if quick else 1300
  # ITM twice the weight of the other losses (reference: all 1): its hard negatives are the scenes
  # of the batch that share the colours, so it is the loss that asks about shape and relation;
  # image->text R@1 37.0 / 35.0 over two seeds against 36.0 / 28.0 (docs/demo.md).
  t.loss_weights.itm = 2.0
  t.log_every_steps = 2 if quick else 50
  t.checkpoint_every_steps = 3 if quick else 400
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 0.05
  config.optim.weight_decay = 0.01

  if "no_eval" not in arg.flags:
    batch_size = 16 if quick else 64
    config.evals.retrieval = common.evaluator(
        "retrieval", file=f"{data_dir}/val_retrieval.jsonl", image_root=data_dir,
        k_test=8 if quick else 16, batch_size=batch_size,
        save_scores=True)  # 100 x 300: small enough to keep the full matrices
    config.evals.grounding = common.evaluator(
        "grounding", files=(f"{data_dir}/val_grounding.jsonl",), image_root=data_dir,
        batch_size=batch_size)
    # Zero-shot, never trained for: each shape cropped and named among the 18 colour-shape
    # classes; the colour and size attributes of each shape's box (OVAD's box-oracle mAP); and
    # Winoground-style groups whose captions swap the objects or the relation.
    config.evals.zeroshot = common.evaluator(
        "zeroshot", files=(f"{data_dir}/zeroshot_val.jsonl",), image_root=data_dir,
        classes=f"{data_dir}/zeroshot_classes.txt", batch_size=batch_size)
    config.evals.ovad = common.evaluator(
        "ovad", files=(f"{data_dir}/ovad_val.json",), image_root=data_dir, object_word="shape",
        batch_size=batch_size)
    config.evals.winoground = common.evaluator(
        "winoground", file=f"{data_dir}/winoground/examples.jsonl", batch_size=batch_size)
  return common.finish(config, arg)
