"""Flax (linen) modules of X2-VLM: BEiT-2 vision tower, BERT text/fusion stack, heads."""
