"""Evaluation: the evaluator interface, shared drivers and metrics (numpy, host-side).

Each evaluator type lives with its task (x2vlm_jax/tasks/<task>.py); these are what they share.
Import the modules themselves (nothing is re-exported, so `retrieval_metrics` the module is never
shadowed by `retrieval_metrics` the function):

  common             the `Evaluator` interface; fixed-size batching over the mesh, splits, files.
  retrieval          ITC similarities + ITM re-ranking of images / videos and texts (the engine
                     of the retrieval evaluators and of `inference.Predictor.score`).
  retrieval_metrics  TR@k / IR@k from [N_img, N_txt] / [N_txt, N_img] score matrices, score
                     files, Karpathy-style annotations.
  rerank             streamed top-k ITM re-ranking of ITC similarities; multi-host row sharding.
  generation         beam search and greedy decoding of text (captions, answers).
Beside them, the official metrics of the answer and caption benchmarks (their scorers' exact
behaviour), used by those tasks' evaluators and by tools/score_*.py.
"""
