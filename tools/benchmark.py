"""Training-step and input-pipeline throughput of X2-VLM; prints one JSON line.

  # the jitted train step on synthetic in-memory batches (the pipeline's keys, shapes and dtypes)
  python tools/benchmark.py --config configs/bench_small.py --steps 10 [--warmup 2] [--batch B]
      [--remat] [--scan-layers] [--dtype bfloat16] [--peak-tflops X] [--cost-analysis] [--profile DIR]
      [--set model.patch_size=12 ...]   (any config field, typed and checked like --config.a.b=v)
  # the input pipeline alone: decoded + augmented + tokenised examples/s with one decoding thread
  python tools/benchmark.py --data --config configs/bench_small.py --data-dir /tmp/demo_data
  python tools/benchmark.py --data --config configs/demo.py:data_dir=/tmp/demo_data
  # an evaluation alone, on synthetic images and captions, phase by phase
  python tools/benchmark.py --eval retrieval --config configs/demo.py --eval-images 1000 \
      [--captions 5 --k-test 16 --eval-batch 64 --embed-dtype bfloat16]
  # XLA's temp buffers of the compiled step at two batch sizes (does remat keep activations?)
  python tools/benchmark.py --config configs/bench_small.py --temp-memory 4,8 --remat --scan-layers

`--data` reads `--data-dir` (a demo dataset from x2vlm_jax/data/demo.py: 200 training scenes of
`--demo-image-size` pixels are written there if it holds none; it feeds the trained tasks it has a
`train_<task>.jsonl` for) or the config's own data files, with num_workers=0, `--read-threads`
decoding threads and no prefetch buffer; it times `--steps` batches of every trained task of the
config after `--warmup` batches.

Train mode builds the `Trainer` of the config (its mesh; a fully fixed mesh smaller than the
machine uses the first devices), initialises a fresh state, makes one synthetic batch per trained
task (`Task.synthetic_batch`: random CLIP-normalised images, [CLS] words [SEP] [PAD].. texts of
random lengths with MLM masking as the pipeline does it, valid boxes and their patch masks,
collated by the task's own collate function; image_text, regions, retrieval and grounding have
one), calls the real `Trainer.train_step` once to compile, `--warmup` more times, then
times `--steps` steps (block_until_ready after each).

`--eval retrieval` runs the retrieval evaluation's engine (x2vlm_jax/evaluate/retrieval.py) on
the config's model with random parameters, over `--eval-images` synthetic uint8 images (made a
batch at a time, as the evaluators decode them) x `--captions` random captions: wall and CPU
seconds per phase (encode_images, encode_texts, candidates, rerank, itc_ranks, metrics),
candidate and distinct pairs, re-ranking pairs/s, analytic FLOPs per phase
(flops.retrieval_eval_flops), peak host RSS and device memory.

Output fields: examples_per_s (texts per step / median step time; a region batch counts its
region texts), step_time_median_s / _p90_s, compile_time_s (first call minus the median step),
flops_per_step (analytic, `Task.forward_flops` from x2vlm_jax/flops.py: matmuls only,
training = 3 x forward),
tflops_per_s, process_cpu_s_per_step (CPU seconds of all this process's threads per timed step;
steadier than wall time on a shared CPU), mfu (null unless the device kind is in PEAK_TFLOPS or
--peak-tflops is given; the peak is per device and multiplied by the mesh size),
peak_memory_bytes (device allocator peak, or the process's max RSS on CPU), device_kind,
jax_version, date. `--cost-analysis` adds XLA's own estimate of the compiled step (xla_flops,
xla_bytes_accessed, xla_over_analytic). `--profile DIR` traces `--profile-steps` more steps
with jax.profiler into DIR and adds `profile`: op thread-milliseconds per step by op kind and by
model part (vision / text_layers / fusion_layers / optimizer / heads_losses_other, forward or
backward), read from the trace and the compiled HLO's op_name metadata.

`--batch B` sets every trained task to B texts and B images (its batch_size, and max_images for a
region batch).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# Dense bf16 peak TFLOP/s per device (and TF32 for float32 matmuls on NVIDIA GPUs), by a
# lower-cased substring of `device.device_kind`; the first match wins.
PEAK_TFLOPS = (
    ("h200", {"bfloat16": 989.0, "float32": 494.7}),
    ("h100", {"bfloat16": 989.0, "float32": 494.7}),
    ("a100", {"bfloat16": 312.0, "float32": 156.0}),
    ("tpu v6 lite", {"bfloat16": 918.0}),
    ("tpu v6e", {"bfloat16": 918.0}),
    ("tpu v5 lite", {"bfloat16": 197.0}),
    ("tpu v5e", {"bfloat16": 197.0}),
    ("tpu v5p", {"bfloat16": 459.0}),
    ("tpu v5", {"bfloat16": 459.0}),
    ("tpu v4", {"bfloat16": 275.0}),
)

def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Per-device dense peak for `dtype` matmuls of a known accelerator, else None (CPUs)."""
  kind = device_kind.lower()
  for key, peaks in PEAK_TFLOPS:
    if key in kind:
      return peaks.get(dtype, peaks["bfloat16"])
  return None


# ---------------------------------------------------------------------------- synthetic batches
def synthetic_batches(config, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """One batch per trained task (`Task.synthetic_batch`: the pipeline's keys, shapes and dtypes,
  collated by the task's own collate function)."""
  from x2vlm_jax import tasks

  rng = np.random.default_rng(seed)
  return {name: task.synthetic_batch(config, rng)
          for name, task in tasks.training_tasks(config).items()}


# ---------------------------------------------------------------------------- helpers
def load_config(spec: str, args):
  from x2vlm_jax.configs_loader import load_config as load

  from x2vlm_jax import tasks

  config = load(spec)
  config.unlock()
  if args.batch:  # every trained task: B texts (and B images for a region batch)
    for name in tasks.training_tasks(config):
      section = config.data[name]
      section.batch_size = args.batch
      if "max_images" in section:
        section.max_images = args.batch
  if args.remat:
    config.model.remat = True
  if args.scan_layers:
    config.model.scan_layers = True
  if args.dtype:
    config.model.dtype = args.dtype
  if args.set:  # typed by the field's default, unknown fields refused (as --config.a.b=v)
    from configs import common
    return common.apply_arg(config, ",".join(args.set))
  config.lock()
  return config


def make_mesh(config):
  """The config's mesh; a fully fixed mesh smaller than the machine takes the first devices."""
  import jax
  from x2vlm_jax import sharding

  sizes = [int(config.mesh[k]) for k in sharding.MESH_AXES]
  devices = jax.devices()
  if -1 not in sizes and math.prod(sizes) < len(devices):
    devices = devices[:math.prod(sizes)]
  return sharding.make_mesh(config.mesh, devices=devices)


def examples_per_step(config) -> dict[str, int]:
  """Texts per batch of each trained task (as train.train_and_evaluate counts examples)."""
  from x2vlm_jax import tasks

  return {name: task.texts_per_batch(config)
          for name, task in tasks.training_tasks(config).items()}


def peak_memory(devices) -> tuple[int, str]:
  """(bytes, source): the device allocator's peak, else the process's max RSS."""
  peaks = []
  for dev in devices:
    try:
      stats = dev.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), "device peak_bytes_in_use (max over devices)"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
  return int(rss), "process max RSS"


def _percentile(values, q):
  return float(np.percentile(np.asarray(values), q))


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _cost(compiled) -> dict:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return dict(ca or {})


# ---------------------------------------------------------------------------- train mode
def bench_train(args) -> dict:
  import jax
  from x2vlm_jax import tasks, train

  config = load_config(args.config, args)
  trainer = train.Trainer.create(config, make_mesh(config))
  kinds = tuple(trainer.tasks)
  state = trainer.init_state(config.train.seed)
  local = synthetic_batches(config, seed=args.seed)
  batches = trainer.global_batches(local)
  base = jax.random.PRNGKey(args.seed)
  rngs = [jax.random.fold_in(base, i) for i in range(1 + args.warmup + args.steps)]
  jax.block_until_ready((state, batches, rngs))

  start = time.perf_counter()
  state, metrics = trainer.train_step(state, batches, rngs[0])
  jax.block_until_ready((state, metrics))
  first_call = time.perf_counter() - start
  for i in range(args.warmup):
    state, metrics = trainer.train_step(state, batches, rngs[1 + i])
    jax.block_until_ready((state, metrics))
  times = []
  cpu_start = time.process_time()
  for i in range(args.steps):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batches, rngs[1 + args.warmup + i])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  cpu_per_step = (time.process_time() - cpu_start) / args.steps

  median = _percentile(times, 50)
  per_kind = examples_per_step(config)
  batch = sum(per_kind.values())
  forward = tasks.forward_flops(config)
  step_flops = tasks.train_step_flops(config)
  tflops = step_flops / median / 1e12
  devices = list(trainer.mesh.devices.flat)
  device_kind = devices[0].device_kind
  peak = args.peak_tflops or peak_tflops(device_kind, config.model.dtype)
  mem, mem_source = peak_memory(devices)
  result = dict(
      mode="train", config=args.config, tasks=list(kinds), batch=batch, batch_sizes=per_kind,
      steps=args.steps, warmup=args.warmup, dtype=config.model.dtype, remat=bool(config.model.remat),
      scan_layers=bool(config.model.scan_layers),
      examples_per_s=batch / median, step_time_median_s=median,
      step_time_p90_s=_percentile(times, 90), step_time_min_s=min(times),
      # CPU seconds of this process per timed step (all threads): on a shared CPU a steadier
      # measure of the work than wall time; / step_time = cores kept busy.
      process_cpu_s_per_step=cpu_per_step, os_cpu_count=os.cpu_count(),
      compile_time_s=max(first_call - median, 0.0), first_call_s=first_call,
      flops_per_step=step_flops, forward_flops=sum(sum(p.values()) for p in forward.values()),
      tflops_per_s=tflops, peak_tflops=peak,
      mfu=(tflops / (peak * len(devices))) if peak else None,
      peak_memory_bytes=mem, peak_memory_source=mem_source,
      loss=float(metrics["loss"]), device_kind=device_kind, platform=devices[0].platform,
      num_devices=len(devices), mesh=dict(trainer.mesh.shape), jax_version=jax.__version__,
      xla_flags=os.environ.get("XLA_FLAGS", ""), date=_now())

  if args.profile:
    result["profile"] = profile_steps(trainer, state, batches, rngs[-1], args.profile,
                                      steps=args.profile_steps)

  if args.cost_analysis:
    cost = _cost(trainer.compile_train_step(batches))
    result["xla_flops"] = float(cost.get("flops", float("nan")))
    result["xla_bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    result["xla_over_analytic"] = result["xla_flops"] / step_flops
  return result


# ---------------------------------------------------------------------------- profile
# Model parts, by the first matching name in an op's HLO `op_name` metadata (the model method,
# JAX transform and Flax module path, e.g. "transpose(jvp(X2VLM.encode_regions))/vision/...";
# the optimizer update runs in the non-finite guard's `cond`).
_PARTS = (("vision", ("X2VLM.encode_image", "X2VLM.encode_regions", "X2VLM.encode_video")),
          ("text_layers", ("X2VLM.encode_text",)), ("fusion_layers", ("X2VLM.fuse",)),
          ("optimizer", ("/cond",)))


def _op_part(op_name: str) -> str:
  direction = "bwd" if "transpose(" in op_name else "fwd"
  for part, keys in _PARTS:
    if any(k in op_name for k in keys):
      return f"{part}/{direction}"
  return f"heads_losses_other/{direction}"


def summarize_profile(xplane_path: str, hlo_text: str, steps: int) -> dict:
  """Thread-milliseconds per step of the XLA ops in a `jax.profiler` trace, by op kind (the op
  name without its number: dot, ynn_fusion = YNNPACK matmul fusions on CPU, copy/transpose
  fusions, ...) and by model part (from the op's `op_name` metadata in the compiled HLO)."""
  import collections
  import re

  import jax

  metadata = dict(re.findall(r"\n\s*%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text))
  by_kind, by_part = collections.Counter(), collections.Counter()
  profile = jax.profiler.ProfileData.from_file(xplane_path)
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        name = event.name
        if name not in metadata:
          continue  # runtime bookkeeping, Python frames: not an op of the step
        by_kind[re.sub(r"[.\d]+$", "", name)] += event.duration_ns
        by_part[_op_part(metadata[name])] += event.duration_ns
  total = sum(by_kind.values())
  ms = lambda ns: round(ns / 1e6 / steps, 1)
  # by_kind: [kind, ms] pairs, largest first (the JSON line sorts dict keys).
  return dict(op_thread_ms_per_step=ms(total),
              by_kind=[[k, ms(v)] for k, v in by_kind.most_common()],
              by_part={k: ms(v) for k, v in by_part.items()})


def profile_steps(trainer, state, batches, rng, out_dir: str, steps: int) -> dict:
  """Traces `steps` train steps with `jax.profiler` into `out_dir` (TensorBoard / Perfetto
  readable) and summarises where the op time went (`summarize_profile`)."""
  import glob

  import jax

  hlo_text = trainer.compile_train_step(batches).as_text()
  with jax.profiler.trace(out_dir):
    for i in range(steps):
      state, metrics = trainer.train_step(state, batches, jax.random.fold_in(rng, i))
      jax.block_until_ready((state, metrics))
  paths = sorted(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise SystemExit(f"--profile: no *.xplane.pb trace was written under {out_dir}")
  return dict(summarize_profile(paths[-1], hlo_text, steps), trace=paths[-1])


def bench_temp_memory(args) -> dict:
  """XLA's buffer assignment for the compiled train step (`memory_analysis()`, one device) at
  two batch sizes: temp bytes at each and their growth per example, the figure that tells
  whether activations are kept (`--remat`, `--set model.remat_policy=...`)."""
  import jax
  from x2vlm_jax import train

  sizes = [int(b) for b in args.temp_memory.split(",")]
  if len(sizes) != 2 or not 0 < sizes[0] < sizes[1]:
    raise SystemExit("--temp-memory takes two batch sizes B1,B2 with 0 < B1 < B2")
  temp = {}
  for batch in sizes:
    args.batch = batch
    config = load_config(args.config, args)
    trainer = train.Trainer.create(config, make_mesh(config))
    batches = trainer.global_batches(synthetic_batches(config, seed=args.seed))
    stats = trainer.compile_train_step(batches).memory_analysis()
    temp[str(batch)] = int(stats.temp_size_in_bytes)  # JSON keys: strings
  growth = (temp[str(sizes[1])] - temp[str(sizes[0])]) / (sizes[1] - sizes[0])
  return dict(mode="temp_memory", config=args.config, set=list(args.set),
              remat=bool(config.model.remat), scan_layers=bool(config.model.scan_layers),
              remat_policy=config.model.remat_policy, temp_bytes=temp,
              temp_bytes_per_example=growth, num_devices=len(trainer.mesh.devices.flat),
              jax_version=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""), date=_now())


# ---------------------------------------------------------------------------- data mode
def bench_data(args) -> dict:
  import jax
  from x2vlm_jax import tasks
  from x2vlm_jax.data import demo

  config = load_config(args.config, args)
  config.unlock()
  d = config.data
  trained = tasks.training_tasks(config)
  if args.data_dir:  # the tasks the demo dataset has training records for (train_<task>.jsonl)
    paths = demo.demo_paths(args.data_dir)
    if not os.path.exists(paths["readme"]):
      demo.make_demo_data(args.data_dir, num_train=200, num_val=10,
                          image_size=args.demo_image_size, seed=0)
    d.vocab_path = paths["vocab"]
    for name in trained:
      if f"train_{name}" in paths:
        d[name].files, d[name].image_root = (paths[f"train_{name}"],), args.data_dir
  d.num_workers = 0
  d.read_threads = args.read_threads
  d.prefetch = 0  # measure the producer itself, not a buffer
  config.lock()

  per_kind = {}
  for name, task in trained.items():
    if not d[name].files:
      raise SystemExit(f"--data: config.data.{name}.files is empty; pass --data-dir DIR (the demo "
                       "dataset is written there if missing) or a config with data files")
    it = task.make_iterator(config, seed=args.seed)
    for _ in range(args.warmup):
      next(it)
    records = texts = 0
    start = time.perf_counter()
    for _ in range(args.steps):
      batch = next(it)
      records += int(batch["num_records"])
      texts += int(batch["text_ids"].shape[0])
    elapsed = time.perf_counter() - start
    per_kind[name] = dict(batches=args.steps, seconds=elapsed,
                          batches_per_s=args.steps / elapsed,
                          records_per_s=records / elapsed,  # decoded + augmented images
                          examples_per_s=texts / elapsed,  # texts (pairs) in the batches
                          examples_per_s_per_thread=texts / elapsed / args.read_threads)
  # The step consumes one batch of every task: its input rate is limited by the slowest.
  step_s = sum(1.0 / v["batches_per_s"] for v in per_kind.values())
  batch = sum(examples_per_step(config).values())
  mem, mem_source = peak_memory([])
  return dict(mode="data", config=args.config, data_dir=args.data_dir, tasks=list(trained),
              image_res=config.model.image_res, read_threads=args.read_threads,
              batches=args.steps, warmup=args.warmup, batch=batch,
              examples_per_s=batch / step_s, per_task=per_kind,
              peak_memory_bytes=mem, peak_memory_source=mem_source,
              cpu_count=os.cpu_count(), jax_version=jax.__version__, date=_now())


# ---------------------------------------------------------------------------- eval mode
class SyntheticImages:
  """N random uint8 images [R, R, 3] (resized pixels, as `eval_data.EvalImages` decodes them; the
  model normalises them on the device), made when their rows are asked for (`load_batches`, as
  `common.run_batched` asks): image i is the same whatever the batch it is read in."""

  def __init__(self, n: int, image_res: int):
    self.n, self.image_res = n, image_res

  def __len__(self) -> int:
    return self.n

  def load_batches(self, batches):
    for rows in batches:
      yield np.stack([np.random.default_rng(int(i)).integers(
          0, 256, (self.image_res, self.image_res, 3), dtype=np.uint8) for i in rows])


def _phase(timings: dict, name: str, fn):
  """Runs `fn` (its device work finished before the clocks stop); wall and CPU seconds."""
  import jax

  wall, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  timings[name] = dict(wall_s=round(time.perf_counter() - wall, 3),
                       cpu_s=round(time.process_time() - cpu, 3))
  return out


def bench_eval(args) -> dict:
  """The retrieval evaluation of `--eval-images` synthetic images x `--captions` random captions
  each, phase by phase (the engine of evaluate/retrieval.py on the config's model, random
  parameters): wall / CPU seconds, pairs and pairs/s, peak host RSS and device memory, FLOPs."""
  import flax.linen as nn
  import jax
  from x2vlm_jax import flops, sharding, tasks
  from x2vlm_jax.data import synthetic
  from x2vlm_jax.evaluate import rerank, retrieval, retrieval_metrics
  from x2vlm_jax.models import x2vlm

  if args.eval != "retrieval":
    raise SystemExit(f"--eval {args.eval}: only 'retrieval' is benchmarked")
  config = load_config(args.config, args)
  mesh = make_mesh(config)
  model = tasks.build_model(config)
  with mesh, nn.logical_axis_rules(sharding.logical_rules(config)):
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(args.seed),
                                               *x2vlm.init_inputs(model))["params"])
  n_img, n_txt = args.eval_images, args.eval_images * args.captions
  rng = np.random.default_rng(args.seed)
  texts = synthetic.synthetic_texts(config, n_txt, rng)
  text_ids = np.stack([t["text_ids"] for t in texts])
  text_atts = np.stack([t["text_atts"] for t in texts])
  txt2img = np.arange(n_txt, dtype=np.int32) // args.captions
  img2txt = [list(range(i * args.captions, (i + 1) * args.captions)) for i in range(n_img)]
  batch = args.eval_batch
  fns = retrieval.make_retrieval_fns(model, mesh, args.embed_dtype)
  timings: dict = {}
  images = SyntheticImages(n_img, config.model.image_res)
  image_embeds, image_feat = _phase(timings, "encode_images", lambda: retrieval.encode_images(
      params, images, batch_size=batch, fns=fns, mesh=mesh))
  text_embeds, text_feat, atts = _phase(timings, "encode_texts", lambda: retrieval.encode_texts(
      params, text_ids, text_atts, batch_size=batch, fns=fns, mesh=mesh))
  k_i2t, k_t2i = min(args.k_test, n_txt), min(args.k_test, n_img)
  (_, cand_i2t), (_, cand_t2i) = _phase(timings, "candidates", lambda: (
      retrieval.top_k_candidates(image_feat, text_feat, k_i2t, fns=fns, mesh=mesh),
      retrieval.top_k_candidates(text_feat, image_feat, k_t2i, fns=fns, mesh=mesh)))
  sizes = (k_i2t, max(1, k_i2t // 8)) if k_i2t > 1 else (1,)
  pairs = rerank.union_pairs(cand_i2t, cand_t2i)

  def score(rows, txt):
    from x2vlm_jax.evaluate import common
    return fns["pair_itm"](params, image_embeds, text_embeds, atts, common.put_batch(rows, mesh),
                           common.put_batch(txt, mesh))[:, 1]

  from x2vlm_jax.evaluate import common
  scores = _phase(timings, "rerank", lambda: rerank.rerank(
      cand_i2t, cand_t2i, score, group_sizes=sizes,
      rows_per_call=lambda g: common.round_batch_size(max(1, batch // g), mesh),
      log_fn=lambda line: None))
  _phase(timings, "itc_ranks", lambda: (
      retrieval.itc_ranks(image_feat, text_feat, img2txt, fns=fns, mesh=mesh),
      retrieval.itc_ranks(text_feat, image_feat, txt2img, fns=fns, mesh=mesh)))
  _phase(timings, "metrics", lambda: retrieval_metrics.metrics_from_ranks(
      retrieval_metrics.ranks_from_candidates(cand_i2t, scores[0], img2txt, n_txt),
      retrieval_metrics.ranks_from_candidates(cand_t2i, scores[1], txt2img, n_img)))
  eval_flops = flops.retrieval_eval_flops(
      config.model, images=n_img, texts=n_txt, text_len=config.data.max_tokens, k=args.k_test,
      distinct_pairs=len(pairs.images))
  devices = list(mesh.devices.flat)
  device_peak = peak_memory(devices)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                               else 1024)
  asked = cand_i2t.size + cand_t2i.size
  return dict(
      mode="eval", eval=args.eval, config=args.config, images=n_img, texts=n_txt,
      k_test=args.k_test, batch=batch, embed_dtype=args.embed_dtype, phases=timings,
      total_wall_s=round(sum(t["wall_s"] for t in timings.values()), 3),
      total_cpu_s=round(sum(t["cpu_s"] for t in timings.values()), 3),
      candidate_pairs=asked, distinct_pairs=len(pairs.images),
      rerank_pairs_per_s=len(pairs.images) / max(timings["rerank"]["wall_s"], 1e-9),
      flops=eval_flops, total_flops=sum(eval_flops.values()),
      peak_host_rss_bytes=int(rss),
      peak_device_bytes=device_peak[0] if "device" in device_peak[1] else None,
      device_kind=devices[0].device_kind, num_devices=len(devices),
      jax_version=jax.__version__, date=_now())


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
  parser.add_argument("--batch", type=int, default=0, help="texts (and images) per batch of every trained task")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (--data: batches)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps after the compiling call (--data: batches)")
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="per-device peak TFLOP/s for the MFU (default: PEAK_TFLOPS table)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set model.patch_size=12 (repeatable)")
  parser.add_argument("--remat", action="store_true", help="config.model.remat = True")
  parser.add_argument("--scan-layers", action="store_true", help="config.model.scan_layers = True")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="",
                      help="config.model.dtype (compute dtype; params stay float32)")
  parser.add_argument("--cost-analysis", action="store_true",
                      help="add XLA's cost analysis of the compiled step (compiles it again)")
  parser.add_argument("--profile", default="",
                      help="trace --profile-steps more steps into this dir with jax.profiler and "
                      "add op time by kind and model part to the JSON line")
  parser.add_argument("--profile-steps", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data", action="store_true", help="benchmark the input pipeline instead")
  parser.add_argument("--temp-memory", default="", metavar="B1,B2",
                      help="instead of timing: the compiled step's temp bytes at batch B1 and B2 "
                      "(XLA's buffer assignment, one device) and their growth per example")
  parser.add_argument("--eval", default="", choices=("", "retrieval"),
                      help="benchmark an evaluation on synthetic data instead")
  parser.add_argument("--eval-images", type=int, default=500, help="--eval: images")
  parser.add_argument("--captions", type=int, default=5, help="--eval: captions per image")
  parser.add_argument("--k-test", type=int, default=16, help="--eval: re-ranking depth")
  parser.add_argument("--eval-batch", type=int, default=64,
                      help="--eval: images / texts per encoding call, ~pairs per ITM call")
  parser.add_argument("--embed-dtype", default="float32", choices=("float32", "bfloat16"),
                      help="--eval: storage of the embeddings the re-ranking reads")
  parser.add_argument("--data-dir", default="",
                      help="--data: demo dataset dir (written if missing) to read from")
  parser.add_argument("--demo-image-size", type=int, default=96,
                      help="--data: image size of a demo dataset written to --data-dir")
  parser.add_argument("--read-threads", type=int, default=1,
                      help="--data: decoding threads (examples_per_s_per_thread divides by it)")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  if args.eval:
    result = bench_eval(args)
  elif args.temp_memory:
    result = bench_temp_memory(args)
  else:
    result = bench_data(args) if args.data else bench_train(args)
  print(json.dumps(result, sort_keys=True), flush=True)
  return result


if __name__ == "__main__":
  main()
