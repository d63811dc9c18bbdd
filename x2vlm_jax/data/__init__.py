"""Data pipeline of x2vlm_jax: the shared ops the tasks (x2vlm_jax/tasks/) build their data from.

Modules: config (the shared data fields, section builders), records (JSONL / ArrayRecord / TFDS
sources), image_ops, text (pre_caption, tokenizers, MLM masking), examples (record -> example
processors shared by several tasks), pipeline (grain iterators, the bad-record budget, shared
collate functions), eval_data (evaluation records, texts and lazily decoded images), video (PyAV
decoding, frame folders, frame sampling), video_examples (video records and clips), synthetic
(random batches for benchmarks), demo (the synthetic demo dataset). Box math is x2vlm_jax/boxes.py.
"""
