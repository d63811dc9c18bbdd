"""XLM-R text encoder (CCLM / multilingual X2-VLM): sentencepiece tokenizer with fairseq ids,
RoBERTa positions, conversion from transformers and CCLM layouts, multilingual retrieval evaluation
and a pre-training step through the data pipeline with the sentencepiece tokenizer.

A tiny sentencepiece model is trained here (no package ships XLM-R's); transformers' PyTorch
XLMRobertaForMaskedLM with random weights is the independent reference.
"""
import json
import math
import os
import pickle
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common, tiny
from x2vlm_jax import convert, tasks, train
from x2vlm_jax.data import eval_data
from x2vlm_jax.data import text as text_lib
from x2vlm_jax.evaluate import common as eval_common
from x2vlm_jax.evaluate import retrieval
from x2vlm_jax.models import bert, x2vlm
from x2vlm_jax.tasks import retrieval as retrieval_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "pretrain_tiny")

# Three languages, a few dozen sentences: enough for a unigram model of ~100 pieces.
SENTENCES = {
    "en": ["a dog runs on the green grass", "two men are playing football in the park",
           "a woman is riding a red bicycle", "children are swimming in the lake",
           "a red square next to a blue circle", "a green triangle on a white background",
           "the cat sleeps on the sofa", "an old man reads a newspaper",
           "people walk along the beach at sunset", "a girl eats an ice cream"],
    "de": ["ein hund läuft auf dem grünen gras", "zwei männer spielen fußball im park",
           "eine frau fährt ein rotes fahrrad", "kinder schwimmen im see",
           "ein rotes quadrat neben einem blauen kreis", "ein grünes dreieck auf weißem grund",
           "die katze schläft auf dem sofa", "ein alter mann liest eine zeitung",
           "menschen gehen bei sonnenuntergang am strand", "ein mädchen isst ein eis"],
    "fr": ["un chien court sur l'herbe verte", "deux hommes jouent au football dans le parc",
           "une femme fait du vélo rouge", "des enfants nagent dans le lac",
           "un carré rouge à côté d'un cercle bleu", "un triangle vert sur un fond blanc",
           "le chat dort sur le canapé", "un vieil homme lit un journal",
           "des gens marchent sur la plage au coucher du soleil", "une fille mange une glace"],
}
PROBES = ["ein hund spielt football im park", "Un chien, court sur l'herbe!",
          "two  men   àé 12 日本 xyz", "a red square next to a blue circle"]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  """A directory holding a freshly trained `sentencepiece.bpe.model` (XLM-R's file name)."""
  import sentencepiece

  out = tmp_path_factory.mktemp("spm")
  sentences = [s for lang in SENTENCES.values() for s in lang] * 3
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=str(out / "spm"), vocab_size=110,
      model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
      minloglevel=2)
  shutil.move(str(out / "spm.model"), str(out / "sentencepiece.bpe.model"))
  return str(out)


@pytest.fixture(scope="module")
def tok(spm_dir):
  return text_lib.load_tokenizer(spm_dir)


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_matches_transformers_xlmr(spm_dir, tok):
  # from_pretrained(dir) converts the .model; XLMRobertaTokenizer(vocab_file=...) would not.
  hf = transformers.XLMRobertaTokenizer.from_pretrained(spm_dir)
  assert isinstance(tok, text_lib.SentencePieceTokenizer)
  assert tok.vocab_size == len(hf)
  assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id) == (
      hf.cls_token_id, hf.pad_token_id, hf.sep_token_id, hf.unk_token_id, hf.mask_token_id)
  assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id) == (
      0, 1, 2, 3, tok.vocab_size - 1)
  for text in PROBES:
    ids = text_lib.add_specials(tok.encode(text), tok, 64)
    assert ids == hf(text)["input_ids"], text
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
  assert tok.encode_batch(PROBES) == [tok.encode(t) for t in PROBES]
  assert tok.unk_id in tok.encode("日本")  # characters absent from the training text
  # One sentence spelled out: "▁ein" opens a word, pieces without "▁" continue it.
  pieces = tok.tokenize("ein hund")
  assert pieces[0] == "▁ein" and [p.startswith("▁") for p in pieces] == [
      not tok.is_subword[i] for i in tok.encode("ein hund")]
  assert not tok.is_subword[[0, 1, 2, 3, tok.mask_id]].any()
  assert pickle.loads(pickle.dumps(tok)).encode(PROBES[0]) == tok.encode(PROBES[0])


def test_load_tokenizer_picks_the_format(spm_dir):
  model_file = os.path.join(spm_dir, "sentencepiece.bpe.model")
  assert isinstance(text_lib.load_tokenizer(model_file), text_lib.SentencePieceTokenizer)
  bert_tok = text_lib.load_tokenizer(os.path.join(FIXTURE, "vocab.txt"))
  assert isinstance(bert_tok, text_lib.Tokenizer) and bert_tok.cls_id != 0
  assert isinstance(text_lib.load_tokenizer(FIXTURE), text_lib.Tokenizer)  # dir with vocab.txt
  with pytest.raises(ValueError, match="config.data.vocab_path"):
    text_lib.load_tokenizer("")


def test_whole_word_spans_follow_word_start_marks(tok):
  ids = text_lib.add_specials(tok.encode("zwei männer spielen fußball"), tok, 64)
  starts = [k for k in range(1, len(ids) - 1) if not tok.is_subword[ids[k]]]
  assert len(starts) == 4  # one "▁" piece per word
  for k in range(1, len(ids) - 1):  # a span started anywhere in a word grows to the whole word
    st, end = text_lib.whole_word_span(ids, k, k + 1, tok.is_subword)
    word = max(s for s in starts if s <= k)
    nxt = min([s for s in starts if s > k] + [len(ids) - 1])
    assert (st, end) == (word, nxt), (k, tok.convert_ids_to_tokens(ids))


# ------------------------------------------------------------------------------ model + converter


def test_roberta_position_ids():
  ids = jnp.array([[0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1]])
  np.testing.assert_array_equal(bert.roberta_position_ids(ids, 1),
                                [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]])


def _hf_xlmr(vocab, width=32, layers=2, heads=2, mlp=64, max_position=40, seed=0):
  cfg = transformers.XLMRobertaConfig(
      vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
      intermediate_size=mlp, max_position_embeddings=max_position, type_vocab_size=1,
      layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(seed)
  hf = transformers.XLMRobertaForMaskedLM(cfg).eval()
  with torch.no_grad():  # randomise LayerNorms and biases, so a swapped scale/bias shows up
    for name, p in hf.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
      elif name.endswith("bias"):
        p.copy_(torch.randn_like(p) * 0.1)
  return hf


def _xlmr_model(vocab, **kw):
  args = dict(image_res=32, patch_size=16, vision_width=16, vision_depth=1, vision_heads=2,
              vision_mlp_dim=32, vocab_size=vocab, text_width=32, text_layers=2, fusion_layers=0,
              text_heads=2, text_mlp_dim=64, max_position=40, type_vocab_size=1,
              text_layer_norm_eps=1e-5, text_position_ids="roberta", text_pad_id=1,
              embed_dim=8, hidden_dropout=0.0, attention_dropout=0.0)
  args.update(kw)
  return x2vlm.X2VLM(**args)


_NOT_TEXT = ("vision/*", "*_proj/*", "temp", "*_head/*")


def _shapes(model):
  """Flat param name -> shape of `model` (no initialisation)."""
  return {p: tuple(v.shape) for p, v in convert.flatten(nn.meta.unbox(
      x2vlm.abstract_variables(model)["params"])).items()}


def test_text_encoder_and_mlm_head_match_transformers_xlmr(tok, tmp_path):
  """transformers XLMRobertaForMaskedLM (random weights) vs our text tower, on padded ids."""
  hf = _hf_xlmr(tok.vocab_size)
  model = _xlmr_model(tok.vocab_size)
  torch.save(hf.state_dict(), tmp_path / "xlmr.bin")  # roberta.* + lm_head.*, as HF ships it
  state = convert.load_torch_state_dict(str(tmp_path / "xlmr.bin"))
  flat, missing = convert.convert_state_dict(state, _shapes(model), allow_missing=_NOT_TEXT)
  assert sorted(flat) == sorted(p for p in _shapes(model) if p.startswith("text/"))
  # The text tower (and `temp`, which the model's setup reads) runs encode_text and mlm_logits.
  params = dict(convert.unflatten(flat), temp=np.float32(0.07))
  enc = text_lib.TextEncoder(tok, max_tokens=24, max_words=24,
                             masking=text_lib.MaskingConfig())
  ids, atts = eval_data.encode_texts(PROBES, PROBES, tok, 24, 24)
  assert (ids == 1).any() and (atts.sum(1) < 24).all()  # padded with <pad> = 1
  assert ids.tolist() == [text_lib.pad_ids(enc.token_ids(t), 24, 1)[0].tolist() for t in PROBES]
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long),
             attention_mask=torch.tensor(atts, dtype=torch.long), output_hidden_states=True)
  variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
  ours = model.apply(variables, jnp.asarray(ids), jnp.asarray(atts), method=x2vlm.X2VLM.encode_text)
  diff = np.abs(np.asarray(ours) - out.hidden_states[-1].numpy())
  assert diff.max() <= 1e-5, diff.max()  # every position, padding included
  # MLM logits at every position (the decoder tied to the word embeddings, as HF ties it).
  vision = jnp.zeros((len(ids), 1, 16), jnp.float32)
  logits = model.apply(variables, jnp.asarray(ids), jnp.asarray(atts), vision,
                       jnp.ones((len(ids), 1), jnp.int32),
                       jnp.tile(jnp.arange(24)[None], (len(ids), 1)),
                       method=x2vlm.X2VLM.mlm_logits)
  diff = np.abs(np.asarray(logits) - out.logits.numpy())
  assert diff.max() <= 1e-5, diff.max()
  # BERT positions (0..L-1) on the same weights give something else: the rule matters.
  bert_pos = _xlmr_model(tok.vocab_size, text_position_ids="absolute").apply(
      variables, jnp.asarray(ids), jnp.asarray(atts), method=x2vlm.X2VLM.encode_text)
  assert np.abs(np.asarray(bert_pos) - np.asarray(ours)).max() > 1e-2


def test_bare_xlmr_model_keys_drop_the_pooler_and_name_what_is_wrong(tok):
  cfg = _hf_xlmr(tok.vocab_size).config
  torch.manual_seed(1)
  bare = {k: v.numpy() for k, v in transformers.XLMRobertaModel(cfg).state_dict().items()}
  assert any(k.startswith("pooler.") for k in bare)
  shapes = _shapes(_xlmr_model(tok.vocab_size, mlm_head=False))
  params, missing = convert.convert_state_dict(bare, shapes, allow_missing=_NOT_TEXT)
  np.testing.assert_array_equal(params["text/layer_1/intermediate/kernel"],
                                bare["encoder.layer.1.intermediate.dense.weight"].T)
  assert not [p for p in missing if p.startswith("text/")]
  broken = dict(bare, **{"encoder.layer.2.output.dense.weight": np.zeros((32, 64), np.float32)})
  del broken["embeddings.LayerNorm.bias"]
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_state_dict(broken, shapes, allow_missing=_NOT_TEXT)
  assert "text/embeddings/LayerNorm/bias" in str(err.value)
  assert "text_encoder.encoder.layer.2.output.dense.weight" in str(err.value)


def test_cclm_checkpoint_layout(tok):
  """CCLM (`XVLMPlusBase`): XLM-R `text_encoder.*` + BERT `cross_encoder.encoder.layer.*` (after
  the text layers) + untied `mlm_head.predictions.*`, next to X2-VLM's vision tower and heads."""
  fixture = convert.load_torch_state_dict(os.path.join(FIXTURE, "checkpoint.th"))
  hf = _hf_xlmr(tok.vocab_size, width=64, heads=2, mlp=128)
  rng = np.random.default_rng(0)
  state = {k: v for k, v in fixture.items() if not k.startswith("text_encoder.")}
  state.update({"text_encoder." + k[len("roberta."):]: v.numpy()
                for k, v in hf.state_dict().items() if k.startswith("roberta.")})
  for k, v in fixture.items():
    layer = k.split(".")[4] if k.startswith("text_encoder.bert.encoder.layer.") else None
    if layer in ("2", "3"):  # the X2-VLM fusion layers become the cross encoder's 0 and 1
      state[k.replace(f"text_encoder.bert.encoder.layer.{layer}.",
                      f"cross_encoder.encoder.layer.{int(layer) - 2}.")] = v
    elif k.startswith("text_encoder.cls.predictions.transform."):
      state[k.replace("text_encoder.cls.", "mlm_head.")] = v
  bias = rng.normal(size=(tok.vocab_size,)).astype(np.float32)
  decoder = rng.normal(size=(tok.vocab_size, 64)).astype(np.float32)
  state.update({"mlm_head.predictions.bias": bias, "mlm_head.predictions.decoder.bias": bias,
                "mlm_head.predictions.decoder.weight": decoder})
  manifest = json.load(open(os.path.join(FIXTURE, "manifest.json")))
  from x2vlm_jax.parity import model_from_manifest
  cclm = model_from_manifest(manifest).clone(
      vocab_size=tok.vocab_size, max_position=40, type_vocab_size=1, text_layer_norm_eps=1e-5,
      fusion_layer_norm_eps=1e-12, text_position_ids="roberta", text_pad_id=1, mlm_head=True,
      mlm_decoder_tied=False)
  shapes = _shapes(cclm)
  params, missing = convert.convert_state_dict(state, shapes)
  assert missing == [] and set(params) == set(shapes)
  np.testing.assert_array_equal(
      params["text/layer_3/crossattention/self/key/kernel"],
      fixture["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"].T)
  np.testing.assert_array_equal(params["text/layer_0/attention/self/query/kernel"],
                                hf.state_dict()["roberta.encoder.layer.0.attention.self.query"
                                                ".weight"].numpy().T)
  np.testing.assert_array_equal(params["text/mlm_decoder/kernel"], decoder.T)
  np.testing.assert_array_equal(params["text/mlm_bias"], bias)
  np.testing.assert_array_equal(params["vision/blocks_1/attn/qkv/kernel"],
                                fixture["vision_encoder.blocks.1.attn.qkv.weight"].T)
  # The converted model runs: the text layers are XLM-R's (eps 1e-5), the fusion layers BERT's.
  variables = {"params": jax.tree_util.tree_map(jnp.asarray, convert.unflatten(params))}
  ids, atts = eval_data.encode_texts(PROBES[:2], PROBES[:2], tok, 16, 16)
  with torch.no_grad():
    want = hf.roberta(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(atts, dtype=torch.long)).last_hidden_state
  got = cclm.apply(variables, jnp.asarray(ids), jnp.asarray(atts), method=x2vlm.X2VLM.encode_text)
  assert np.abs(np.asarray(got) - want.numpy()).max() <= 1e-5
  # A tied model cannot take the untied decoder; a missing or stray cross-encoder key is named.
  tied_shapes = {p: s for p, s in shapes.items() if p != "text/mlm_decoder/kernel"}
  with pytest.raises(convert.ConversionError, match="mlm_decoder_tied=False"):
    convert.convert_state_dict(state, tied_shapes)
  broken = dict(state, **{"cross_encoder.pooler.dense.weight": np.zeros((64, 64), np.float32)})
  del broken["cross_encoder.encoder.layer.1.output.dense.weight"]
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_state_dict(broken, shapes)
  assert "text/layer_3/output/dense/kernel" in str(err.value)
  assert "cross_encoder.pooler.dense.weight" in str(err.value)


# ------------------------------------------------------------------------------ retrieval


class _CodeModel(nn.Module):
  """Parameter-free, known answers: image i carries code e_i (pixel row 0); a text's ids[0] is
  the image it describes for ITC, ids[1] for ITM."""
  n: int = 4

  def encode_image(self, x):
    return x[:, :1, :self.n, 0]

  def image_features(self, e):
    return e[:, 0]

  def encode_text(self, ids, atts):
    return jax.nn.one_hot(ids, self.n) * atts[..., None]

  def text_features(self, e):
    return e[:, 0]

  def fuse(self, v, va, t, ta):
    return v[:, :1] * t[:, 1:2]

  def itm_logits(self, cross):
    s = jnp.sum(cross[:, 0], -1)
    return jnp.stack([-s, s], -1)


def test_multilingual_retrieval_with_known_answers(monkeypatch):
  n = 4
  images = np.zeros((n, 8, 8, 3), np.float32)
  images[np.arange(n), 0, np.arange(n), 0] = 1.0
  txt2img = np.repeat(np.arange(n), 2).astype(np.int32)  # two captions per image
  img2txt = [[2 * i, 2 * i + 1] for i in range(n)]
  right = np.stack([txt2img, txt2img], 1)
  itm_wrong = np.stack([txt2img, (txt2img + 1) % n], 1)  # ITC right, ITM prefers the next image
  half = right.copy()
  half[1::2, 1] = n  # every image's second caption matches no image in ITM (a zero code)
  captions = {"en": right, "de": itm_wrong, "fr": half}
  langs = {lang: dict(text_ids=ids.astype(np.int32), text_atts=np.ones_like(ids),
                      txt2img=txt2img, img2txt=img2txt) for lang, ids in captions.items()}
  calls = []
  encode_images = retrieval.encode_images
  monkeypatch.setattr(retrieval, "encode_images",
                      lambda *a, **k: calls.append(1) or encode_images(*a, **k))
  results = retrieval.evaluate_multilingual_retrieval(
      _CodeModel(), {}, dict(images=images, languages=langs), k_test=2 * n, batch_size=3,
      include_itc=True)
  metrics = {lang: r.metrics for lang, r in results.items()}
  assert len(calls) == 1  # the images are encoded once for the three languages
  assert list(metrics) == ["en", "de", "fr"]
  assert all(m["itc_txt_r1"] == m["itc_img_r1"] == 100.0 for m in metrics.values())
  assert metrics["en"]["txt_r1"] == metrics["en"]["img_r1"] == 100.0
  assert metrics["de"]["txt_r1"] == metrics["de"]["img_r1"] == 0.0  # ITM re-ranks them away
  # fr: each image's first caption is ITM-right -> TR@1 100; the second captions tie at 0 over
  # all images and the stable sort puts image 0 first -> IR@1 (4 + 1) / 8.
  assert metrics["fr"]["txt_r1"] == 100.0 and metrics["fr"]["img_r1"] == 62.5
  for lang, ids in captions.items():
    single = dict(images=images, text_ids=ids.astype(np.int32), text_atts=np.ones_like(ids),
                  txt2img=txt2img, img2txt=img2txt)
    want = retrieval.evaluate_retrieval(_CodeModel(), {}, single, k_test=2 * n, batch_size=3,
                                        include_itc=True)
    assert metrics[lang] == want.metrics
    for got, expected in zip(results[lang].dense(), want.dense()):
      np.testing.assert_array_equal(got, expected)


COLORS = {"en": ["red", "green", "blue"], "de": ["rotes", "grünes", "blaues"],
          "fr": ["rouge", "vert", "bleu"]}


def _write_multilingual_set(root):
  captions = []
  for i, rgb in enumerate([(220, 20, 20), (20, 200, 20), (20, 20, 220)]):
    img = np.zeros((40, 48, 3), np.uint8)
    img[:] = rgb
    img[10:30, 12 + 8 * i:30 + 8 * i] = 255  # a white square, shifted per image
    Image.fromarray(img).save(os.path.join(root, f"{i}.png"))
    captions.append({"image": f"{i}.png", "caption": {
        "en": [f"a {COLORS['en'][i]} square", f"a white square on {COLORS['en'][i]}"],
        "de": f"ein {COLORS['de'][i]} quadrat",
        "fr": [f"un carré {COLORS['fr'][i]}"]}})
  with open(os.path.join(root, "test.jsonl"), "w") as f:
    for rec in captions:
      f.write(json.dumps(rec, ensure_ascii=False) + "\n")
  return captions


def _xlmr_tiny_config(spm_dir, vocab_size):
  config = tiny.get_config()
  config.unlock()
  config.model.update(vocab_size=vocab_size, max_position=32, type_vocab_size=1,
                      text_layer_norm_eps=1e-5, text_position_ids="roberta", text_pad_id=1)
  config.data.vocab_path = spm_dir
  return config


def test_multilingual_retrieval_from_config(spm_dir, tok, tmp_path):
  captions = _write_multilingual_set(str(tmp_path))
  config = _xlmr_tiny_config(spm_dir, tok.vocab_size)
  config.evals.retrieval = common.evaluator(
      "multilingual_retrieval", file=str(tmp_path / "test.jsonl"), image_root=str(tmp_path),
      languages=("en", "de", "fr"), k_test=2, batch_size=4, save_scores=True)
  model = x2vlm.build_model(config.model)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *x2vlm.init_inputs(model)))["params"]
  out_dir = tmp_path / "predictions"
  results = eval_common.run_all(tasks.make_evaluators(config, model), params, 0,
                                predictions_dir=str(out_dir))
  names = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
  assert {f"eval/retrieval/{lang}/{k}" for lang in ("en", "de", "fr", "mean") for k in names} <= set(results)
  # Each language equals the single-language evaluation of its own captions (same images).
  for lang in ("en", "de", "fr"):
    single = tmp_path / f"{lang}.jsonl"
    with open(single, "w") as f:
      for rec in captions:
        f.write(json.dumps({"image": rec["image"], "caption": rec["caption"][lang]}) + "\n")
    data = retrieval_task.load_retrieval_eval(str(single), str(tmp_path), 32, tok, 12)
    single_result = retrieval.evaluate_retrieval(model, params, data, k_test=2, batch_size=4)
    want, (i2t, _) = single_result.metrics, single_result.dense()
    for k in names:
      assert results[f"eval/retrieval/{lang}/{k}"] == pytest.approx(want[k], abs=1e-9), (lang, k)
    saved = np.load(out_dir / f"retrieval_{lang}_scores.npz")
    np.testing.assert_allclose(saved["scores_i2t"], i2t, atol=1e-5)
  assert results["eval/retrieval/mean/r_mean"] == pytest.approx(
      np.mean([results[f"eval/retrieval/{lang}/r_mean"] for lang in ("en", "de", "fr")]))
  en = retrieval_task.load_multilingual_retrieval_eval(str(tmp_path / "test.jsonl"),
                                                       str(tmp_path), 32, tok, 12)
  assert list(en["languages"]) == ["de", "en", "fr"]  # default: the first record's, sorted
  assert en["languages"]["en"]["img2txt"] == [[0, 1], [2, 3], [4, 5]]
  with open(tmp_path / "bad.jsonl", "w") as f:
    f.write(json.dumps({"image": "0.png", "caption": {"en": ["a red square"]}}) + "\n")
  with pytest.raises(eval_data.BadDataError, match=r"bad.jsonl:1: no 'de' captions"):
    retrieval_task.load_multilingual_retrieval_eval(str(tmp_path / "bad.jsonl"), str(tmp_path),
                                                    32, tok, 12, languages=("en", "de"))


# ------------------------------------------------------------------------------ pre-training


def test_pretraining_step_with_the_sentencepiece_tokenizer(spm_dir, tok, tmp_path):
  rng = np.random.default_rng(0)
  with open(tmp_path / "train.jsonl", "w") as f:
    for i, (lang, sentences) in enumerate(sorted(SENTENCES.items()) * 3):
      Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
      f.write(json.dumps({"image": f"{i}.png", "caption": sentences[i % len(sentences)]},
                         ensure_ascii=False) + "\n")
  config = _xlmr_tiny_config(spm_dir, tok.vocab_size)
  config.train.tasks = {"image_text": 1.0}
  d = config.data
  d.image_text.files = (str(tmp_path / "train.jsonl"),)
  d.image_text.image_root = str(tmp_path)
  d.read_threads, d.mask_prob, d.max_masks, d.max_tokens, d.max_words = 1, 0.4, 4, 20, 20
  tasks.check_tokenizer(config)
  batch = next(tasks.get("image_text").make_iterator(config, seed=0))
  ids, atts, masked = batch["text_ids"], batch["text_atts"], batch["text_ids_masked"]
  lengths = atts.sum(1)
  assert (ids[:, 0] == tok.cls_id).all() and (ids[np.arange(len(ids)), lengths - 1] == tok.sep_id).all()
  assert ((ids == tok.pad_id) == (atts == 0)).all() and (lengths < 20).any()  # <pad> = 1
  assert ((ids >= 0) & (ids < tok.vocab_size)).all() and ((masked >= 0) & (masked < tok.vocab_size)).all()
  valid = batch["masked_ids"] != text_lib.IGNORE_ID
  pos = batch["masked_pos"]
  assert valid.any(axis=1).all() and (pos[valid] >= 1).all()
  assert (pos[valid] < np.repeat(lengths, valid.sum(1))).all()  # never <s> or padding
  rows = np.repeat(np.arange(len(ids)), valid.sum(1))
  np.testing.assert_array_equal(batch["masked_ids"][valid], ids[rows, pos[valid]])
  changed = masked != ids
  in_masks = np.zeros_like(changed)
  in_masks[rows, pos[valid]] = True
  assert not (changed & ~in_masks).any()  # only masked positions differ ...
  assert (masked[changed] == tok.mask_id).mean() > 0.5  # ... mostly with <mask>
  assert config.model.vocab_size == tok.vocab_size and tok.mask_id == tok.vocab_size - 1

  trainer = train.Trainer.create(config)
  assert tuple(trainer.tasks) == ("image_text",)
  state = trainer.init_state(0)
  state, metrics = trainer.train_step(state, trainer.global_batches({"image_text": batch}),
                                      jax.random.PRNGKey(0))
  mlm = float(metrics["image_text/mlm"])
  assert math.isfinite(float(metrics["loss"]))
  assert abs(mlm - math.log(tok.vocab_size)) < 0.5  # near-uniform predictions at init
  config.model.text_pad_id = 0
  with pytest.raises(ValueError, match="pads with id 1"):
    tasks.check_tokenizer(config)


def test_multilingual_retrieval_config():
  from x2vlm_jax.configs_loader import load_config
  config = load_config("configs/finetune/multilingual_retrieval.py")
  m = config.model
  assert (m.vocab_size, m.max_position, m.type_vocab_size, m.text_pad_id) == (250002, 514, 1, 1)
  assert (m.text_layers, m.fusion_layers, m.text_position_ids) == (12, 6, "roberta")
  assert (m.text_layer_norm_eps, m.fusion_layer_norm_eps) == (1e-5, 1e-12)
  params = x2vlm.abstract_variables(x2vlm.build_model(m))["params"]
  emb = nn.meta.unbox(params)["text"]["embeddings"]
  assert emb["word_embeddings"]["embedding"].shape == (250002, 768)
  assert emb["position_embeddings"]["embedding"].shape == (514, 768)
  # X2-VLM-base (254,758,401) - its MLM head (622,650) + XLM-R's larger embeddings (168,561,408)
  # + the 384-px relative position tables (12 layers x 1,480 rows x 12 heads = 213,120).
  assert x2vlm.count_params(params) == 254_758_401 - 622_650 + 168_561_408 + 213_120
  with pytest.raises(ValueError, match="config.data.vocab_path"):  # the tokenizer is required
    tasks.check_tokenizer(config)
  conv = load_config("configs/finetune/multilingual_retrieval.py:large,model.mlm_head=True,"
                     "model.mlm_decoder_tied=False")
  assert (conv.model.text_layers, conv.model.text_width, conv.model.mlm_decoder_tied) == (24, 1024, False)
