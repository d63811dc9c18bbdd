"""COCO captioning as MLM generation: training sequences, the label-smoothed loss, greedy and beam
decoding (against a transcription of the reference's beam search), a tiny model that learns to
caption, and fine-tuning + evaluation from the demo config."""
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
from x2vlm_jax import cli, losses, sharding, tasks
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import caption_metrics, common, generation
from x2vlm_jax.models import x2vlm
from x2vlm_jax.tasks import captioning

# ----------------------------------------------------------------------------------- the data
WORDS = ["a", "picture", "of", "red", "circle", "left", "blue", "square", "."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s"])
                  + "\n")
  return text_lib.load_tokenizer(str(path))


def test_sequence_with_inserted_masks_is_built_by_hand(tokenizer):
  # [CLS] a picture of red circles [SEP] with "red" (3) and [SEP] (6) chosen.
  ids = [2, 5, 6, 7, 8, 9, 14, 3]
  assert tokenizer.convert_ids_to_tokens(ids) == [
      "[CLS]", "a", "picture", "of", "red", "circle", "##s", "[SEP]"]
  ex = captioning.build_caption_example(ids, [4, 7], mask_id=4, pad_id=0, ignore_id=2,
                                        max_tokens=8, max_masks=3)
  np.testing.assert_array_equal(ex["text_ids"], [2, 5, 6, 7, 4, 8, 9, 14, 4, 3, 0])
  np.testing.assert_array_equal(ex["position_ids"], [0, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8])
  np.testing.assert_array_equal(ex["masked_pos"], [4, 8, 0])
  np.testing.assert_array_equal(ex["masked_ids"], [8, 3, 2])  # padded with the ignore id
  np.testing.assert_array_equal(ex["masked_weight"], [1, 1, 0])
  expected = np.tril(np.ones((11, 11), np.int32))
  expected[:, [4, 8]] = 0
  expected[4, 4] = expected[8, 8] = 1
  np.testing.assert_array_equal(ex["text_atts"], expected)
  # The [MASK] of "red" sees [CLS] a picture of + itself; "red" does not see its [MASK]; the
  # [MASK] of [SEP] sees every real token before it but not the other [MASK].
  assert ex["text_atts"][4].nonzero()[0].tolist() == [0, 1, 2, 3, 4]
  assert ex["text_atts"][5].nonzero()[0].tolist() == [0, 1, 2, 3, 5]
  assert ex["text_atts"][8].nonzero()[0].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]


def test_caption_encoder_masks_only_the_caption(tokenizer):
  masking = text_lib.MaskingConfig(mask_prob=0.6, max_masks=18)
  enc = captioning.CaptionEncoder(tokenizer, "a picture of", 40, 18, masking)
  caption = "a red circle left of a blue squares ."
  ids = enc.token_ids(caption)
  assert ids[:4] == [2, 5, 6, 7] and ids[-1] == 3 and len(ids) == 15  # squares = square ##s
  for seed in range(20):
    ex = enc(caption, np.random.default_rng(seed))
    n_masks = int(ex["masked_weight"].sum())
    assert n_masks == 7  # round((15 - 3 prompt tokens) * 0.6) = 7
    slots = ex["masked_pos"][:n_masks]
    assert np.all(ex["text_ids"][slots] == 4)
    positions = ex["position_ids"][slots]
    assert positions.min() >= 4  # [CLS] and the prompt are never masked
    np.testing.assert_array_equal(np.asarray(ids)[positions], ex["masked_ids"][:n_masks])
  # Cut to max_tokens: a long caption loses its [SEP] (as the reference).
  short = captioning.CaptionEncoder(tokenizer, "a picture of", 6, 4, masking)
  assert short.token_ids(caption) == [2, 5, 6, 7, 5, 8]
  with pytest.raises(text_lib.EmptyCaptionError):
    enc.token_ids("  ")


def test_caption_eval_records_merge_images_and_parse_ids(tmp_path):
  path = tmp_path / "val.jsonl"
  rows = [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["a", "b"]},
          {"image": "x/img_7.png", "image_id": "12", "caption": "c"},
          {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["d"]},
          {"image": "noid.png", "caption": ["e"]}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  data = captioning.load_caption_eval(str(path), "/root")
  assert data["image_ids"] == [391895, 12, "noid.png"]
  assert data["image_paths"] == ["/root/val2014/COCO_val2014_000000391895.jpg", "/root/x/img_7.png",
                                 "/root/noid.png"]
  assert data["references"] == {391895: ["a", "b", "d"], 12: ["c"], "noid.png": ["e"]}


# ----------------------------------------------------------------------------------- the loss
def test_label_smoothing_loss_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  vocab, smoothing, ignore = 7, 0.1, 2
  logits = rng.normal(size=(2, 3, vocab)).astype(np.float32) * 2
  targets = np.array([[5, 0, 3], [6, ignore, ignore]], np.int32)
  weights = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
  expected_terms = []
  for b in range(2):
    for m in range(3):
      z = logits[b, m].astype(np.float64)
      log_p = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
      q = np.full(vocab, smoothing / (vocab - 2))
      q[targets[b, m]] = 1 - smoothing
      q[ignore] = 0.0
      if targets[b, m] == ignore:
        q[:] = 0.0
      kl = sum(q[v] * (np.log(q[v]) - log_p[v]) for v in range(vocab) if q[v] > 0)
      expected_terms.append(weights[b, m] * kl)
  expected = sum(expected_terms) / (weights.sum() + 1e-5)
  got = losses.label_smoothing_loss(jnp.asarray(logits), jnp.asarray(targets),
                                    jnp.asarray(weights), smoothing, ignore_id=ignore)
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # Per-row ignore ids (the objective passes each sequence's [CLS]) give the same number.
  got_rows = losses.label_smoothing_loss(jnp.asarray(logits), jnp.asarray(targets),
                                         jnp.asarray(weights), smoothing,
                                         ignore_id=jnp.full((2, 1), ignore))
  assert float(got_rows) == pytest.approx(float(got), rel=1e-6)
  # A model that predicts the target distribution exactly has zero loss.
  q = np.full((1, 1, vocab), smoothing / (vocab - 2))
  q[0, 0, 4], q[0, 0, ignore] = 1 - smoothing, 1e-30
  zero = losses.label_smoothing_loss(jnp.log(jnp.asarray(q, jnp.float32)),
                                     jnp.array([[4]]), jnp.ones((1, 1)), smoothing, ignore)
  assert abs(float(zero)) < 1e-5


# ----------------------------------------------------------------------------------- decoding
EOS, MASK, PAD = 3, 4, 0
PROMPT = [2, 5]  # [CLS] + one prompt token


def _fake_model(table_prev, table_prev2, bias):
  """log_prob_fn whose log-probs depend on the two previous tokens and the row's bias [N, V]."""
  table_prev, table_prev2, bias = (jnp.asarray(x, jnp.float32)
                                   for x in (table_prev, table_prev2, bias))

  def log_prob_fn(ids, slot):
    prev = jnp.take(ids, slot - 1, axis=1)
    prev2 = jnp.take(ids, slot - 2, axis=1)
    assert ids.shape[0] == bias.shape[0]
    return jax.nn.log_softmax(table_prev[prev] + table_prev2[prev2] + bias, axis=-1)

  return log_prob_fn


def _random_tables(vocab, batch, seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(vocab, vocab)) * 2, rng.normal(size=(vocab, vocab)),
          rng.normal(size=(batch, vocab)) * 2)


def _beam(tables, batch, k, max_length, min_length, **kw):
  prev, prev2, bias = tables
  fn = _fake_model(prev, prev2, np.repeat(bias, k, axis=0))
  out = jax.jit(lambda: generation.beam_search(
      fn, PROMPT, batch, num_beams=k, max_length=max_length, min_length=min_length, eos_id=EOS,
      mask_id=MASK, pad_id=PAD, **kw))()
  return out, generation.best_sequences(out, eos_id=EOS,
                                        length_penalty=kw.get("length_penalty", 0.0))


def _greedy(tables, batch, max_length, min_length, **kw):
  prev, prev2, bias = tables
  fn = _fake_model(prev, prev2, bias)
  tokens, steps = jax.jit(lambda: generation.greedy_search(
      fn, PROMPT, batch, max_length=max_length, min_length=min_length, eos_id=EOS, mask_id=MASK,
      pad_id=PAD, **kw))()
  return generation.greedy_sequences(np.asarray(tokens), int(steps), eos_id=EOS)


def _reference_beam_search(tables, batch, k, max_length, min_length, length_penalty=0.0):
  """The reference's `beam_search` transcribed into numpy on one row at a time (no caching, no
  early stop), with the same float32 step log-probs."""
  prev, prev2, bias = tables
  single = [jax.jit(_fake_model(prev, prev2, bias[b:b + 1])) for b in range(batch)]

  def log_probs(b, seq):
    ids = np.full((1, len(PROMPT) + max_length), PAD, np.int32)
    ids[0, : len(seq)] = seq
    ids[0, len(seq)] = MASK
    return np.asarray(single[b](jnp.asarray(ids), len(seq)))[0]

  neg = np.float32(generation.NEG)
  seqs = [[list(PROMPT)] for _ in range(batch)]
  total_scores, beam_masks, step_ids, step_ptrs, forbid = [], [], [], [], None
  for step in range(max_length):
    lp = np.stack([np.stack([log_probs(b, s) for s in seqs[b]]) for b in range(batch)])
    if forbid is not None:
      lp = lp + forbid * neg
    if min_length and step + 1 <= min_length:
      lp[:, :, EOS] = neg
    kk_ids = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    kk_scores = np.take_along_axis(lp, kk_ids, axis=-1)
    if step == 0:
      ids, scores, ptrs = kk_ids[:, 0], kk_scores[:, 0], np.zeros((batch, k), int)
    else:
      kk_scores = kk_scores + (beam_masks[-1] * neg + total_scores[-1])[..., None]
      flat = kk_scores.reshape(batch, k * k)
      order = np.argsort(-flat, axis=-1, kind="stable")[:, :k]
      scores = np.take_along_axis(flat, order, axis=-1)
      ptrs = order // k
      ids = np.take_along_axis(kk_ids.reshape(batch, k * k), order, axis=-1)
    step_ids.append(ids)
    step_ptrs.append(ptrs)
    total_scores.append(scores.astype(np.float32))
    beam_masks.append((ids == EOS).astype(np.float32))
    seqs = [[seqs[b][ptrs[b, j]] + [int(ids[b, j])] for j in range(k)] for b in range(batch)]
    forbid = np.zeros(lp.shape[:2] + (lp.shape[-1],), np.float32)
    for b in range(batch):
      for j, seq in enumerate(seqs[b]):
        gen = seq[len(PROMPT):]
        if len(gen) >= 3:
          for i in range(len(gen) - 2):
            if gen[i:i + 2] == gen[-2:]:
              forbid[b, j, gen[i + 2]] = 1
  out = []
  for b in range(batch):
    wids = [x[b] for x in step_ids]
    last = next((i for i, w in enumerate(wids) if all(t == EOS for t in w)), len(wids) - 1)
    best, frame, pos = -np.inf, -1, -1
    for fid in range(last + 1):
      for i, wid in enumerate(wids[fid]):
        if wid == EOS or fid == last:
          s = total_scores[fid][b, i]
          if length_penalty > 0:
            s /= ((5 + fid + 1) / 6.0) ** length_penalty
          if s > best:
            best, frame, pos = s, fid, i
    seq = [int(wids[frame][pos])]
    for fid in range(frame, 0, -1):
      pos = step_ptrs[fid][b][pos]
      seq.append(int(wids[fid - 1][pos]))
    out.append(seq[::-1])
  return out


def test_beam_search_matches_the_reference_algorithm():
  tables = _random_tables(vocab=12, batch=3, seed=1)
  tables[2][:, EOS] += 2.0  # finish within a few steps, so several beams end at different steps
  for lp in (0.0, 1.0):
    _, ours = _beam(tables, 3, 3, max_length=8, min_length=2, length_penalty=lp)
    assert ours == _reference_beam_search(tables, 3, 3, 8, 2, length_penalty=lp)
  assert any(len(s) < 8 and s[-1] == EOS for s in ours)


def test_greedy_equals_beam_of_one_and_early_stop_changes_nothing():
  tables = _random_tables(vocab=16, batch=4, seed=2)
  tables[2][:, EOS] += 5.0  # every image finishes before max_length
  greedy = _greedy(tables, 4, max_length=10, min_length=3)
  _, beam1 = _beam(tables, 4, 1, max_length=10, min_length=3)
  assert greedy == beam1
  early, beam3 = _beam(tables, 4, 3, max_length=10, min_length=3)
  full, beam3_full = _beam(tables, 4, 3, max_length=10, min_length=3, early_stop=False)
  assert beam3 == beam3_full
  assert int(full.num_steps) == 10 and int(early.num_steps) < 10
  # Deterministic: the same numbers twice.
  again, _ = _beam(tables, 4, 3, max_length=10, min_length=3)
  for a, b in zip(early, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_beam_search_finds_the_better_caption_greedy_misses():
  # Step 0: A (6) 0.6, B (7) 0.4. After A every continuation is 0.25 (so greedy takes [SEP], the
  # lowest id among the ties: 0.6 * 0.25 = 0.15); after B, [SEP] has 0.99 (0.396).
  vocab = 8
  prev = np.full((vocab, vocab), -30.0)
  prev[5, 6], prev[5, 7] = np.log(0.6), np.log(0.4)
  prev[6, [EOS, 5, 6, 7]] = np.log(0.25)
  prev[7, EOS], prev[7, 5] = np.log(0.99), np.log(0.01)
  tables = (prev, np.zeros((vocab, vocab)), np.zeros((1, vocab)))
  assert _greedy(tables, 1, max_length=4, min_length=0) == [[6, EOS]]
  out, beam = _beam(tables, 1, 2, max_length=4, min_length=0)
  assert beam == [[7, EOS]]
  assert float(out.scores[1, 0, 0]) == pytest.approx(np.log(0.4 * 0.99), abs=1e-4)


def test_min_length_and_repeated_trigrams_are_forbidden():
  vocab = 8
  # [SEP] is always the likeliest token; after it come A (6) and B (7) alternately.
  prev = np.full((vocab, vocab), -5.0)
  prev[:, EOS] = 0.0
  prev[5, 6] = prev[6, 7] = prev[7, 6] = -1.0
  tables = (prev, np.zeros((vocab, vocab)), np.zeros((2, vocab)))
  for seqs in (_greedy(tables, 2, 12, min_length=4), _beam(tables, 2, 3, 12, 4)[1]):
    assert all(len(s) == 5 and s[-1] == EOS and EOS not in s[:-1] for s in seqs), seqs
  # Without [SEP], the model would repeat "A B A B ..."; trigrams may not repeat.
  prev[:, EOS] = -50.0
  tables = (prev, np.zeros((vocab, vocab)), np.zeros((1, vocab)))
  no_rule = _greedy(tables, 1, 8, 0, no_repeat_trigrams=False)[0]
  assert no_rule == [6, 7, 6, 7, 6, 7, 6, 7]
  for seq in (_greedy(tables, 1, 8, 0)[0], _beam(tables, 1, 3, 8, 0)[1][0]):
    trigrams = [tuple(seq[i:i + 3]) for i in range(len(seq) - 2)]
    assert len(trigrams) == len(set(trigrams)) and len(seq) == 8, seq
  gen = jnp.array([[6, 7, 6, 7, 0, 0]])
  forbidden = generation.repeated_trigram_tokens(gen, jnp.int32(4), vocab)
  # The last two tokens "6 7" already occur at the start, followed by 6: 6 is forbidden.
  assert np.flatnonzero(np.asarray(forbidden[0])).tolist() == [6]


def test_decode_text_skips_specials_and_merges_pieces(tokenizer):
  ids = [2, 5, 8, 12, 14, 13, 3, 0]  # [CLS] a red square ##s . [SEP] [PAD]
  assert generation.decode_text(tokenizer, ids) == "a red squares."


# ----------------------------------------------------------------------------------- a model
def test_a_tiny_model_learns_to_caption_two_images():
  cfg = tiny.get_config()
  cfg.unlock()
  cfg.model.hidden_dropout = cfg.model.attention_dropout = cfg.model.drop_path_rate = 0.0
  model = x2vlm.build_model(cfg.model)
  cls, sep, mask, pad = 2, 3, 4, 0
  prompt = [cls, 10, 11]
  captions = [[20, 21, 22], [23, 21, 24]]
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  examples = []
  for cap in captions:
    ids = prompt + cap + [sep]
    examples.append(captioning.build_caption_example(
        ids, range(3, len(ids)), mask_id=mask, pad_id=pad, ignore_id=cls, max_tokens=7,
        max_masks=4))
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  batch["image"] = images
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model))["params"])
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(lambda q: model.apply(
        {"params": q}, batch, None, method=lambda m, b, r: captioning.TASK.loss(
            m, b, r, deterministic=True, config=cfg))["caption"])(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  history = []
  for _ in range(60):
    params, opt, loss = step(params, opt)
    history.append(float(loss))
  assert history[-1] < 0.25 * history[0], history[::10]
  before = common.TRACE_COUNTS["captions_beam1"]
  rules = dict(max_length=5, min_length=1, eos_id=sep, mask_id=mask, pad_id=pad, vocab_size=30)
  greedy_fn = captioning.make_caption_fn(model, prompt, num_beams=1, **rules)
  for _ in range(2):  # compiled once
    tokens, steps = greedy_fn(params, jnp.asarray(images))
  assert common.TRACE_COUNTS["captions_beam1"] == before + 1
  expected = [c + [sep] for c in captions]
  assert generation.greedy_sequences(np.asarray(tokens), int(steps), eos_id=sep) == expected
  beam_fn = captioning.make_caption_fn(model, prompt, num_beams=2, **rules)
  beam = beam_fn(params, jnp.asarray(images))
  assert generation.best_sequences(beam, eos_id=sep) == expected


# ----------------------------------------------------------------------------------- the CLI
def test_captioning_fine_tunes_and_evaluates_from_the_demo_config(tmp_path):
  data_dir = str(tmp_path / "demo_data")
  config = demo_tasks.get_config(f"captioning,quick,data_dir={data_dir}")  # writes the data
  workdir = str(tmp_path / "caption")
  results = cli.train(config, workdir)
  predictions = json.load(open(os.path.join(workdir, "captioning_val_retrieval.json")))
  val = [json.loads(line) for line in open(os.path.join(data_dir, "val_retrieval.jsonl"))]
  assert [p["image_id"] for p in predictions] == list(range(len(val)))
  assert all(isinstance(p["caption"], str) for p in predictions)
  # The written captions, scored against the references, give the logged numbers.
  refs = {i: r["caption"] for i, r in enumerate(val)}
  scored = caption_metrics.score_captions(refs, {p["image_id"]: p["caption"] for p in predictions})
  split = "eval/captioning/val_retrieval"
  assert scored["cider"] == pytest.approx(results[f"{split}/cider"], abs=1e-9)
  assert scored["bleu_4"] == pytest.approx(results[f"{split}/bleu_4"], abs=1e-9)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  caption_losses = [r["captioning/caption"] for r in records if "captioning/caption" in r]
  assert len(caption_losses) == 3 and all(np.isfinite(caption_losses))
  # The evaluator compiles its decoder once: two runs over two batches (the last one padded).
  config.unlock()
  config.evals.captioning.batch_size = 8
  model, params, _ = cli.load_for_eval(config, workdir)
  evaluator = tasks.make_evaluators(config, model, sharding.make_mesh(config.mesh))["captioning"]
  before = common.TRACE_COUNTS["captions_beam3"]
  first, second = evaluator.run(params), evaluator.run(params)
  assert common.TRACE_COUNTS["captions_beam3"] == before + 1 and first == second
  # The decoded sequence must fit the position table: [CLS] a picture of + 29 > 32.
  config.evals.captioning.max_length = 29
  with pytest.raises(ValueError, match=r"config.evals.captioning.max_length 29 .* exceed "
                                       r"config.model.max_position 32"):
    tasks.make_evaluators(config, model)
  config.evals.captioning.max_length = 16
  # The MLM head is required.
  config.model.mlm_head = False
  with pytest.raises(ValueError, match="needs config.model.mlm_head = True"):
    cli.train(config, str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="needs config.model.mlm_head = True"):
    tasks.make_evaluators(config, tasks.build_model(config))
