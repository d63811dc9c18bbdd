"""Evaluation: metrics (numpy, host-side) and model-agnostic evaluation drivers.

Import the modules themselves (nothing is re-exported, so `retrieval_metrics` the module is never
shadowed by `retrieval_metrics` the function):

  retrieval_metrics  TR@k / IR@k from [N_img, N_txt] / [N_txt, N_img] score matrices, score
                     files, Karpathy-style annotations.
  rerank             streamed top-k ITM re-ranking of ITC similarities; multi-host row sharding.
  grounding_metrics  box IoU (incl. the reference's "+1 pixel" RefCOCO convention), Acc@IoU.
"""
