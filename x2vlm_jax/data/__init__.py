"""Data pipeline of x2vlm_jax: grain sources, image/box/text ops, MLM masking, batches, eval sets.

Modules: config (data_config), records (JSONL / ArrayRecord / TFDS sources), image_ops, boxes,
text (pre_caption, tokenizer, MLM masking), examples (per-record processing), pipeline (grain
iterators, BadDataError), eval_data (retrieval / grounding evaluation sets), demo (synthetic data),
video (PyAV decoding, frame folders, frame sampling), video_examples (video-text / video-QA
records, batches and evaluation sets).
Shapes are documented in pipeline.py and eval_data.py.
"""
