"""Loss functions against direct numpy formulas and hand-computed cases."""
import jax
import jax.numpy as jnp
import numpy as np

from x2vlm_jax import boxes, losses


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _features(seed, n=6, e=8):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(2, n, e)).astype(np.float32)
  return f / np.linalg.norm(f, axis=-1, keepdims=True)


def test_itc_is_symmetric_cross_entropy():
  img, txt = _features(0)
  temp = 0.07
  logits = img @ txt.T / temp
  expected = -(np.diag(_log_softmax(logits)).mean() + np.diag(_log_softmax(logits.T)).mean()) / 2
  np.testing.assert_allclose(losses.itc_loss(img, txt, temp), expected, rtol=1e-5)


def test_itc_soft_targets_for_same_image_ids():
  img, txt = _features(1)
  idx = np.array([0, 0, 1, 2, 2, 2])
  logits = img @ txt.T / 0.1
  pos = (idx[:, None] == idx[None]).astype(np.float64)
  tgt = pos / pos.sum(1, keepdims=True)
  expected = -((_log_softmax(logits) * tgt).sum(1).mean() + (_log_softmax(logits.T) * tgt).sum(1).mean()) / 2
  np.testing.assert_allclose(losses.itc_loss(img, txt, 0.1, jnp.asarray(idx)), expected, rtol=1e-5)
  # With unique ids the soft-target loss equals the plain one.
  np.testing.assert_allclose(losses.itc_loss(img, txt, 0.1, jnp.arange(6)),
                             losses.itc_loss(img, txt, 0.1), rtol=1e-6)


def test_hard_negatives_never_positive_and_follow_similarity():
  img, txt = _features(2, n=4)
  idx = jnp.array([0, 0, 1, 2])
  sample = jax.jit(jax.vmap(lambda k: losses.sample_hard_negatives(k, img, txt, 0.5, idx)))
  neg_img, neg_txt = sample(jax.random.split(jax.random.PRNGKey(0), 4000))
  neg_img, neg_txt = np.asarray(neg_img), np.asarray(neg_txt)
  idx = np.asarray(idx)
  assert (idx[neg_img] != idx[None]).all() and (idx[neg_txt] != idx[None]).all()
  # Empirical frequencies follow softmax(sim_t2i) restricted to negatives (+1e-5).
  sim_t2i = txt @ img.T / 0.5
  w = np.exp(sim_t2i - sim_t2i.max(1, keepdims=True))
  w = w / w.sum(1, keepdims=True) + 1e-5
  w[idx[:, None] == idx[None]] = 0
  w = w / w.sum(1, keepdims=True)
  freq = np.stack([np.bincount(neg_img[:, t], minlength=4) / 4000 for t in range(4)])
  np.testing.assert_allclose(freq, w, atol=0.03)


def test_itm_loss_labels_positives_one():
  pos = jnp.array([[0.0, 2.0]])
  neg = jnp.array([[1.0, -1.0], [3.0, 0.0]])
  lp = lambda l, c: np.log(np.exp(l[c]) / np.exp(l).sum())
  expected = -(lp(np.array([0.0, 2.0]), 1) + lp(np.array([1.0, -1.0]), 0) + lp(np.array([3.0, 0.0]), 0)) / 3
  np.testing.assert_allclose(losses.itm_loss(pos, neg), expected, rtol=1e-6)


def test_mlm_ignores_padding_slots():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 10))
  labels = jnp.array([[1, 4, -100], [7, -100, -100]])
  lsm = np.asarray(jax.nn.log_softmax(logits))
  expected = -(lsm[0, 0, 1] + lsm[0, 1, 4] + lsm[1, 0, 7]) / 3
  np.testing.assert_allclose(losses.mlm_loss(logits, labels), expected, rtol=1e-5)
  assert float(losses.mlm_loss(logits, jnp.full((2, 3), -100))) == 0.0


def test_giou_hand_cases():
  a = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
  b = jnp.array([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
  # overlap 1, union 7, hull 9: 1/7 - 2/9 ; disjoint: 0 - (3 - 2)/3
  np.testing.assert_allclose(boxes.generalized_iou(a, b), [1 / 7 - 2 / 9, -1 / 3], rtol=1e-6)


def test_box_losses_exclude_whole_image_rows_and_never_nan():
  pred = jnp.array([[0.5, 0.5, 0.2, 0.2], [0.4, 0.5, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0]])
  tgt = jnp.array([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0]])
  l1, giou = losses.box_losses(pred, tgt, jnp.array([0.0, 0.0, 1.0]))
  np.testing.assert_allclose(l1, 0.1 / 2, rtol=1e-5)
  # row 1: boxes [0.3,0.3,0.5,0.7] vs [0.4,0.3,0.6,0.7]: inter .04, union .12, hull .12 -> 1/3
  np.testing.assert_allclose(giou, (1 - 1 / 3) / 2, rtol=1e-5)
  l1, giou = losses.box_losses(pred, tgt, jnp.ones(3))
  assert float(l1) == 0.0 and float(giou) == 0.0
  # A degenerate target row gets no GIoU term and no NaN gradient; the other rows keep theirs.
  bad = tgt.at[0, 2].set(0.0)
  grad = jax.grad(lambda p: sum(losses.box_losses(p, bad, jnp.array([0.0, 0.0, 1.0]))))(pred)
  assert np.isfinite(np.asarray(grad)).all()
  _, giou = losses.box_losses(pred, bad, jnp.array([0.0, 0.0, 1.0]))
  np.testing.assert_allclose(giou, (1 - 1 / 3) / 2, rtol=1e-5)
