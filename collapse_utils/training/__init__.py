"""Training: datasets, CLIP wrappers (full FT, LoRA, freezing), zero-shot, the experiment."""
