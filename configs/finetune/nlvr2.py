"""NLVR2: is a sentence true of a pair of images? (the reference's `XVLMForNLVR`).

Each image is fused with the sentence; the two fused [CLS] are concatenated into a new 2-way MLP
head (trained at lr x 2); cross-entropy. X2-VLM released no NLVR2 hyper-parameters; these follow
its X-VLM lineage (REFERENCE_DETAILED.md §4.3): image_res 384, 10 examples per GPU x 8 GPUs per
host, lr 3e-5, weight decay 0.01, 10 epochs with 10% warm-up. NLVR2 train holds 86,373 examples:
10 epochs / 80 per step = 10,797 steps. Accuracy on dev and test-P.

  python main.py --config configs/finetune/nlvr2.py --workdir runs/nlvr2 \
      --config.init.checkpoint=ckpt/x2vlm_base_4m --config.data.vocab_path=bert/vocab.txt

Records `{"images": [relpath0, relpath1], "sentence", "label": "True" | "False"}`. arg: `large`
selects X2-VLM-large; `field=value` overrides.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, flags=tuple(common.MODEL_SIZES), file="configs/finetune/nlvr2.py")
  config = common.finetune_config(common.size_of(arg), image_res=384, task="nlvr2")
  d = config.data
  d.max_tokens = d.max_words = 40
  n = d.nlvr2
  n.files = ["data/finetune/nlvr_train.json"]
  n.image_root = "data/nlvr2"
  n.batch_size = 80  # per host: 8 GPUs x 10
  t = config.train
  t.total_steps = 10_797
  t.log_every_steps = 100
  t.checkpoint_every_steps = 1_080  # once per epoch
  o = config.optim
  o.lr = 3e-5
  o.lr_mult = 2.0  # the new head
  config.evals.nlvr2 = common.evaluator(
      "nlvr2", files=("data/finetune/nlvr_dev.json", "data/finetune/nlvr_test.json"),
      image_root="data/nlvr2", batch_size=64)
  return common.finish(config, arg)
