"""AdamW groups / decay table / schedule / clipping / accumulation vs a hand-written numpy AdamW."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from x2vlm_jax import optim

# Names in the project's Flax layout (brief) and the group the reference would put them in:
# (lr multiplier, decayed?).
EXPECTED_GROUPS = {
    "vision/blocks_3/attn/qkv/kernel": (1.0, True),
    "vision/blocks_3/attn/q_bias": (1.0, False),
    "vision/blocks_3/attn/relative_position_bias_table": (1.0, False),
    "vision/blocks_3/norm1/scale": (1.0, False),
    "vision/blocks_3/norm2/bias": (1.0, False),
    "vision/blocks_3/gamma_1": (1.0, True),
    "vision/cls_token": (1.0, True),
    "vision/fc_norm/bias": (1.0, False),
    "vision/fc_norm/scale": (1.0, False),
    "text/embeddings/word_embeddings/embedding": (1.0, True),
    "text/embeddings/LayerNorm/scale": (1.0, False),
    "text/layer_3/output/LayerNorm/bias": (1.0, False),
    "text/layer_14/attention/self/query/kernel": (1.0, True),
    "text/layer_14/crossattention/self/query/kernel": (2.0, True),
    "text/layer_14/crossattention/self/query/bias": (2.0, False),
    "text/layer_14/crossattention/output/LayerNorm/scale": (2.0, False),
    "text/mlm_head/transform/dense/kernel": (1.0, True),
    "text/mlm_head/transform/LayerNorm/scale": (1.0, False),
    "text/mlm_head/bias": (1.0, False),
    "vision_proj/kernel": (2.0, True),
    "text_proj/bias": (2.0, False),
    "temp": (2.0, True),
    "itm_head/dense_0/kernel": (2.0, True),
    "itm_head/norm/scale": (2.0, True),  # reference quirk: `itm_head.1.weight` is decayed
    "itm_head/norm/bias": (2.0, False),
    "itm_head/dense_1/bias": (2.0, False),
    "bbox_head/norm/scale": (2.0, True),
    "frame_pos_embed": (2.0, True),
}


def _tree_from_names(names, shape_fn):
  tree = {}
  for name in names:
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = shape_fn(name)
  return tree


def _flat(tree):
  return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_param_groups_reference_table():
  params = _tree_from_names(EXPECTED_GROUPS, lambda _: jnp.zeros((2,)))
  assert optim.param_groups(params, optim.optim_config()) == EXPECTED_GROUPS
  fixed = optim.param_groups(params, dict(no_decay_rule="all_norms"))
  assert fixed["itm_head/norm/scale"] == (2.0, False)
  assert fixed["bbox_head/norm/scale"] == (2.0, False)
  assert {k: v for k, v in fixed.items() if "_head/norm/scale" not in k} == {
      k: v for k, v in EXPECTED_GROUPS.items() if "_head/norm/scale" not in k}
  summary = optim.format_param_groups(params, optim.optim_config())
  assert "lr x2 decay" in summary and "lr x1 no decay" in summary


# A small model spanning all four groups; shapes kept tiny.
SMALL = {
    "text/layer_0/attention/self/query/kernel": (3, 4),   # x1, decay
    "text/layer_0/attention/self/query/bias": (4,),       # x1, no decay
    "text/layer_14/crossattention/self/key/kernel": (4, 2),  # x2, decay
    "text/layer_14/crossattention/output/LayerNorm/scale": (4,),  # x2, no decay
    "itm_head/norm/scale": (2,),                          # x2, decay (quirk)
    "temp": (),                                           # x2, decay
}


def _small_params(seed=0):
  rng = np.random.default_rng(seed)
  return _tree_from_names(SMALL, lambda n: rng.normal(size=SMALL[n]).astype(np.float32))


def _numpy_adamw(params, grads_seq, *, lr_fn, groups, b1, b2, eps, wd, clip):
  """torch.optim.AdamW with param groups, written out in float64."""
  p = {k: v.astype(np.float64) for k, v in _flat(params).items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: x.astype(np.float64) for k, x in _flat(grads).items()}
    if clip:
      norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
      g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
    for k in p:
      scale, decayed = groups[k]
      lr = lr_fn(t - 1) * scale
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + (wd * p[k] if decayed else 0.0))
  return p


def _run_optax(tx, params, grads_seq):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _grads(n, seed=1, scales=None):
  rng = np.random.default_rng(seed)
  scales = scales or [1.0] * n
  return [_tree_from_names(SMALL, lambda k: (s * rng.normal(size=SMALL[k])).astype(np.float32))
          for s in scales]


@pytest.mark.parametrize("steps,warmup,clip,scales", [
    (1, 0.0, 0.0, None),                      # one step, lr = peak at update 0
    (3, 2.0, 1.0, [5.0, 0.2, 3.0]),           # warm-up + decay, clipping active on steps 1 and 3
])
def test_adamw_matches_numpy_reference(steps, warmup, clip, scales):
  cfg = optim.optim_config()
  cfg.update(dict(lr=1e-2, weight_decay=0.1, warmup_steps=warmup,
                  grad_clip_norm=clip))
  params = _small_params()
  grads = _grads(steps, scales=scales)
  tx, schedule = optim.make_optimizer(cfg, params, total_steps=10)
  got = _flat(_run_optax(tx, params, grads))
  groups = optim.param_groups(params, cfg)
  want = _numpy_adamw(params, grads, lr_fn=lambda t: float(schedule(t)), groups=groups,
                      b1=0.9, b2=0.98, eps=1e-8, wd=0.1, clip=clip)
  for k in SMALL:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
  # The groups make a difference that 1e-6 resolves: moving a tensor to another group fails.
  wrong = dict(groups)
  wrong["temp"] = (1.0, False)
  other = _numpy_adamw(params, grads, lr_fn=lambda t: float(schedule(t)), groups=wrong,
                       b1=0.9, b2=0.98, eps=1e-8, wd=0.1, clip=clip)
  assert abs(float(other["temp"]) - float(got["temp"])) > 1e-4
  if clip:  # and so does clipping
    unclipped = _numpy_adamw(params, grads, lr_fn=lambda t: float(schedule(t)), groups=groups,
                             b1=0.9, b2=0.98, eps=1e-8, wd=0.1, clip=0.0)
    assert max(np.abs(unclipped[k] - got[k]).max() for k in SMALL) > 1e-4


def test_adamw_matches_torch_param_groups():
  torch = pytest.importorskip("torch")
  cfg = optim.optim_config()
  cfg.update(dict(lr=1e-2, weight_decay=0.1, warmup_steps=0.0, grad_clip_norm=0.0))
  params = _small_params()
  grads = _grads(2)
  tx, schedule = optim.make_optimizer(cfg, params, total_steps=10)
  got = _flat(_run_optax(tx, params, grads))
  groups = optim.param_groups(params, cfg)
  tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
             for k, v in _flat(params).items()}
  torch_groups = [
      dict(params=[tensors[k] for k, g in groups.items() if g == (s, d)], lr=1e-2 * s,
           weight_decay=0.1 if d else 0.0)
      for s in (1.0, 2.0) for d in (True, False)]
  opt = torch.optim.AdamW(torch_groups, betas=(0.9, 0.98), eps=1e-8)
  lr_lambda = lambda t: float(schedule(t)) / 1e-2
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
  for g in grads:
    for k, x in _flat(g).items():
      tensors[k].grad = torch.tensor(x, dtype=torch.float64)
    opt.step()
    sched.step()
  for k in SMALL:
    np.testing.assert_allclose(got[k], tensors[k].detach().numpy(), atol=1e-6, err_msg=k)


def test_schedule_values():
  sched = optim.warmup_linear_decay(1e-4, 2500, 10000)
  steps = np.array([0, 1, 1250, 2500, 6250, 9999, 10000, 12000])
  want = 1e-4 * np.array([0, 1 / 2500, 0.5, 1, 0.5, 1 / 7500, 0, 0])
  np.testing.assert_allclose(np.asarray(jax.vmap(sched)(steps)), want, rtol=1e-6, atol=1e-12)
  cfg = optim.optim_config()
  cfg.warmup_steps = 0.1  # a fraction of the total
  _, s = optim.make_optimizer(cfg, {"temp": jnp.zeros(())}, total_steps=1000)
  assert float(s(50)) == pytest.approx(0.5e-4) and float(s(100)) == pytest.approx(1e-4)
  assert optim.resolve_warmup_steps(2500.0, 10) == 2500
  assert optim.resolve_warmup_steps(0.05, 1000) == 50


def test_gradient_accumulation_equals_mean_gradient_step():
  k = 3
  cfg = optim.optim_config()
  cfg.update(dict(lr=1e-2, warmup_steps=0.0, grad_clip_norm=1.0))
  params = _small_params()
  micro = _grads(2 * k, scales=[4.0, 0.5, 2.0, 1.0, 3.0, 0.1])
  means = [jax.tree.map(lambda *g: np.mean(g, axis=0), *micro[i:i + k])
           for i in range(0, 2 * k, k)]
  tx1, _ = optim.make_optimizer(cfg, params, total_steps=10)
  want = _flat(_run_optax(tx1, params, means))

  cfg.accumulate_steps = k
  txk, _ = optim.make_optimizer(cfg, params, total_steps=10)
  state = txk.init(params)
  p = params
  update = jax.jit(txk.update)
  for i, g in enumerate(micro):
    before = _flat(p)
    updates, state = update(g, state, p)
    p = optax.apply_updates(p, updates)
    if (i + 1) % k:  # no parameter change between accumulation boundaries
      assert all(np.array_equal(before[n], v) for n, v in _flat(p).items())
  got = _flat(p)
  for n in SMALL:
    np.testing.assert_allclose(got[n], want[n], atol=1e-6, err_msg=n)


def test_init_on_boxed_abstract_params_keeps_logical_axes():
  boxed = {"text_proj": {"kernel": nn.Partitioned(
      jax.ShapeDtypeStruct((8, 4), jnp.float32), names=("embed", "proj"))},
           "temp": jax.ShapeDtypeStruct((), jnp.float32)}
  cfg = dict(warmup_steps=0.0, accumulate_steps=2)
  tx, _ = optim.make_optimizer(cfg, boxed, total_steps=10)
  abstract_state = jax.eval_shape(tx.init, boxed)
  specs = jax.tree.leaves(nn.get_partition_spec(abstract_state))
  assert jax.sharding.PartitionSpec("embed", "proj") in specs
  assert optim.param_groups(boxed, cfg) == {"text_proj/kernel": (2.0, True), "temp": (2.0, True)}


@pytest.mark.parametrize("overrides,total,match", [
    (dict(), 0, r"config.train.total_steps must be > 0.*found 0"),
    (dict(warmup_steps=20.0), 10, r"warmup_steps=20.0 resolves to 20 steps"),
    (dict(no_decay_rule="bert"), 10, r"no_decay_rule='bert'.*all_norms"),
    (dict(learning_rate=1.0), 10, r"unknown fields \['learning_rate'\]"),
    (dict(total_steps=10), 10, r"unknown fields \['total_steps'\]"),  # train.total_steps is the one
])
def test_config_errors(overrides, total, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(overrides, {"temp": jnp.zeros(())}, total_steps=total)
