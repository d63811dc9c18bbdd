"""Generative VQA: the answer decoder (parity with transformers' BertLMHeadModel), its weighted
answer loss, answer-list ranking, initialisation from the fusion layers, and fine-tuning +
evaluation from the config on the demo scenes."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from configs.finetune import demo_tasks
from x2vlm_jax import cli, convert, losses
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import vqa, vqa_generative


def test_answer_weights_are_each_answers_share():
  weighted = vqa_generative.answer_weights(["red"] * 6 + ["blue"] * 3 + ["dark red"])
  assert weighted == [("red", 0.6), ("blue", 0.3), ("dark red", 0.1)]
  assert vqa_generative.answer_weights("on the table ", vg_weight=0.5) == [("on the table", 0.5)]


def test_tokenize_answers_is_cls_answer_sep_padded(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue",
                              "dark", "##er"]) + "\n")
  tok = text_lib.load_tokenizer(str(vocab))
  ids, atts = vqa_generative.tokenize_answers(["Red", "darker blue", ""], tok, 4)
  np.testing.assert_array_equal(ids, [[2, 5, 3, 0], [2, 7, 8, 3], [2, 3, 0, 0]])
  np.testing.assert_array_equal(atts, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


def test_sequence_nll_scores_tokens_after_the_first():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
  ids = np.array([[2, 5, 3, 0], [2, 6, 1, 3]], np.int32)
  atts = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = [-(log_p[0, 0, 5] + log_p[0, 1, 3]), -(log_p[1, 0, 6] + log_p[1, 1, 1] + log_p[1, 2, 3])]
  np.testing.assert_allclose(losses.sequence_nll(logits, ids, atts), want, rtol=1e-5)
  loss = losses.weighted_answer_loss(jnp.array([[1.0, 2.0], [4.0, 8.0]]),
                                     jnp.array([[0.5, 0.5], [1.0, 0.0]]))
  assert float(loss) == pytest.approx((0.5 + 1.0 + 4.0) / 2)


DECODER_LAYERS = 1


def _tiny(**fields):
  cfg = tiny.get_config()
  cfg.unlock()
  cfg.model.hidden_dropout = cfg.model.attention_dropout = cfg.model.drop_path_rate = 0.0
  for k, v in fields.items():
    cfg.model[k] = v
  model = x2vlm.build_model(cfg.model, answer_decoder_layers=DECODER_LAYERS)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"])
  return cfg, model, params


def test_decoder_matches_transformers_bert_lm_head_model():
  """Our decoder with weights converted from a random transformers `BertLMHeadModel` (causal,
  with cross-attention: the reference's `text_decoder`) gives the same logits and the same
  per-answer NLL as torch, through the converter's `text_decoder.*` mapping."""
  torch = pytest.importorskip("torch")
  import transformers

  cfg, model, params = _tiny()
  m = cfg.model
  hf_cfg = transformers.BertConfig(
      vocab_size=m.vocab_size, hidden_size=m.text_width, num_hidden_layers=DECODER_LAYERS,
      num_attention_heads=m.text_heads, intermediate_size=m.text_mlp_dim,
      max_position_embeddings=m.max_position, is_decoder=True, add_cross_attention=True,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(0)
  hf = transformers.BertLMHeadModel(hf_cfg).eval()
  with torch.no_grad():  # random LayerNorms and biases, so that a swapped one shows
    for name, p in hf.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  state = {"text_decoder." + k: v.numpy() for k, v in hf.state_dict().items()}
  shapes = {p: tuple(v.shape) for p, v in convert.flatten(params).items()
            if p.startswith("answer_decoder/")}
  converted, missing = convert.convert_state_dict(state, shapes)
  assert not missing and set(converted) == set(shapes)
  flat = convert.flatten(params)
  flat.update(converted)
  params = convert.unflatten(flat)

  rng = np.random.default_rng(1)
  ids = rng.integers(5, m.vocab_size, (3, 6)).astype(np.int32)
  atts = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3], np.int32)
  question = rng.normal(size=(3, 5, m.text_width)).astype(np.float32)
  q_atts = np.array([[1] * 5, [1] * 3 + [0] * 2, [1] * 5], np.int32)
  ours = model.apply({"params": params}, ids, atts, question, q_atts,
                     method=x2vlm.X2VLM.answer_logits)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(atts),
                encoder_hidden_states=torch.tensor(question),
                encoder_attention_mask=torch.tensor(q_atts)).logits.numpy()
  valid = atts.astype(bool)  # logits at padded positions are not used
  np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=2e-5, rtol=1e-5)
  # The loss the reference computes: shifted CE with pads -> -100, summed per answer.
  labels = torch.tensor(np.where(atts > 0, ids, -100), dtype=torch.long)
  ce = torch.nn.functional.cross_entropy(torch.tensor(theirs[:, :-1]).reshape(-1, m.vocab_size),
                                         labels[:, 1:].reshape(-1), reduction="none")
  np.testing.assert_allclose(losses.sequence_nll(ours, ids, atts),
                             ce.reshape(3, -1).sum(1).numpy(), rtol=1e-5)


def test_decoder_is_causal():
  cfg, model, params = _tiny()
  rng = np.random.default_rng(2)
  ids = rng.integers(5, cfg.model.vocab_size, (1, 6)).astype(np.int32)
  changed = ids.copy()
  changed[0, 4:] = (ids[0, 4:] + 1) % cfg.model.vocab_size
  question = rng.normal(size=(1, 3, cfg.model.text_width)).astype(np.float32)
  ones = np.ones((1, 6), np.int32)
  run = lambda x: np.asarray(model.apply({"params": params}, x, ones, question,
                                         np.ones((1, 3), np.int32),
                                         method=x2vlm.X2VLM.answer_logits))
  a, b = run(ids), run(changed)
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
  assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3


def test_rank_answers_is_the_reference_score():
  """k = A: the order is log p(first token) - NLL(answer) over the whole list (brute force);
  k < A: only the answers whose first token is likeliest are re-scored."""
  cfg, model, params = _tiny()
  rng = np.random.default_rng(3)
  r, v = cfg.model.image_res, cfg.model.vocab_size
  batch = dict(image=rng.normal(size=(2, r, r, 3)).astype(np.float32),
               text_ids=rng.integers(5, v, (2, 5)).astype(np.int32),
               text_atts=np.array([[1] * 5, [1] * 3 + [0] * 2], np.int32))
  answer_ids = np.array([[2, 7, 3, 0], [2, 9, 11, 3], [2, 13, 3, 0], [2, 7, 8, 3],
                         [2, 20, 3, 0]], np.int32)
  answer_atts = (np.arange(4)[None] <= np.array([2, 3, 2, 3, 2])[:, None]).astype(np.int32)
  apply = lambda k: model.apply({"params": params}, batch, answer_ids, answer_atts, k,
                                method=vqa_generative.rank_answers)
  ranked, probs = apply(5)
  states = model.apply({"params": params}, batch, method=vqa.question_states)
  scores, firsts = np.zeros((2, 5)), np.zeros((2, 5))
  for b in range(2):
    rep = lambda x: np.repeat(np.asarray(x)[b:b + 1], 5, axis=0)
    logits = model.apply({"params": params}, answer_ids, answer_atts, rep(states),
                         rep(batch["text_atts"]), method=x2vlm.X2VLM.answer_logits)
    nll = np.asarray(losses.sequence_nll(logits, answer_ids, answer_atts))
    first = np.asarray(jax.nn.log_softmax(logits[:, 0], axis=-1))[np.arange(5), answer_ids[:, 1]]
    scores[b], firsts[b] = first - nll, first
  np.testing.assert_array_equal(ranked, np.argsort(-scores, axis=1, kind="stable"))
  np.testing.assert_allclose(probs, np.sort(np.exp(scores) / np.exp(scores).sum(1, keepdims=True),
                                            axis=1)[:, ::-1], rtol=1e-4, atol=1e-6)
  top2, _ = apply(2)
  for b in range(2):  # kept: the 2 best first tokens (ties: lower index); then ordered by score
    kept = np.argsort(-firsts[b], kind="stable")[:2]
    np.testing.assert_array_equal(top2[b], kept[np.argsort(-scores[b][kept], kind="stable")])


def test_answer_decoder_starts_as_the_fusion_layers():
  flat = {"text/embeddings/word_embeddings/embedding": np.zeros((4, 2)),
          "text/mlm_bias": np.ones((4,)), "text/layer_0/x": np.full((1,), 0.0),
          **{f"text/layer_{i}/x": np.full((1,), float(i)) for i in range(1, 7)},
          "vision/cls_token": np.zeros((1,))}
  deep = convert.answer_decoder_from_fusion(flat, text_layers=3, fusion_layers=4,
                                            decoder_layers=4)
  assert {k: float(v[0]) for k, v in deep.items() if "layer_" in k} == {
      "answer_decoder/layer_0/x": 3.0, "answer_decoder/layer_1/x": 4.0,
      "answer_decoder/layer_2/x": 5.0, "answer_decoder/layer_3/x": 6.0}
  assert "answer_decoder/embeddings/word_embeddings/embedding" in deep
  assert "answer_decoder/mlm_bias" in deep and not any(k.startswith("vision") for k in deep)
  half = convert.answer_decoder_from_fusion(flat, text_layers=3, fusion_layers=4,
                                            decoder_layers=2)
  assert {k: float(v[0]) for k, v in half.items() if "layer_" in k} == {
      "answer_decoder/layer_0/x": 4.0, "answer_decoder/layer_1/x": 6.0}
  with pytest.raises(ValueError, match="must equal the fusion layers"):
    convert.answer_decoder_from_fusion(flat, text_layers=3, fusion_layers=4, decoder_layers=3)


def test_decoder_learns_to_answer():
  """A few questions with known answers: the weighted answer loss falls and ranking the answer
  list then returns every question's majority answer."""
  cfg, model, params = _tiny()
  rng = np.random.default_rng(4)
  r, v = cfg.model.image_res, cfg.model.vocab_size
  answer_list = np.array([[2, 7, 3, 0], [2, 9, 11, 3], [2, 13, 3, 0], [2, 7, 8, 3]], np.int32)
  answer_atts = (answer_list > 0).astype(np.int32)
  answer_atts[:, 0] = 1
  truth = np.array([0, 3, 1, 2])  # 0 and 3 share their first token
  batch = dict(image=rng.normal(size=(4, r, r, 3)).astype(np.float32),
               text_ids=rng.integers(5, v, (4, 5)).astype(np.int32),
               text_atts=np.ones((4, 5), np.int32))
  # Two answers per question: the true one (weight 0.8) and another (0.2).
  other = (truth + 1) % 4
  batch["answer_ids"] = np.stack([answer_list[truth], answer_list[other]], axis=1)
  batch["answer_atts"] = np.stack([answer_atts[truth], answer_atts[other]], axis=1)
  batch["answer_weights"] = np.tile(np.array([[0.8, 0.2]], np.float32), (4, 1))
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(lambda q: model.apply(
        {"params": q}, batch, None, method=lambda m, b, r: vqa_generative.TASK.loss(
            m, b, r, deterministic=True, config=None))["vqa_answer"])(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  history = []
  for _ in range(60):
    params, opt, loss = step(params, opt)
    history.append(float(loss))
  assert history[-1] < 0.5 * history[0], history[::10]
  ranked, _ = model.apply({"params": params}, batch, answer_list, answer_atts, 4,
                          method=vqa_generative.rank_answers)
  np.testing.assert_array_equal(np.asarray(ranked)[:, 0], truth)


def test_generative_vqa_fine_tunes_and_evaluates_from_the_config(tmp_path):
  data_dir = str(tmp_path / "demo")
  config = demo_tasks.get_config(f"vqa_generative,quick,data_dir={data_dir}")  # writes the data
  workdir = str(tmp_path / "run")
  results = cli.train(config, workdir)
  assert 0.0 <= results["eval/vqa_generative/val_vqa/acc"] <= 100.0
  answers = set(json.load(open(os.path.join(data_dir, "answer_list.json"))))
  predictions = json.load(open(os.path.join(workdir, "vqa_generative_val_vqa.json")))
  assert predictions and all(p["answer"] in answers for p in predictions)
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("vqa_generative/vqa_answer" in r for r in logged)
