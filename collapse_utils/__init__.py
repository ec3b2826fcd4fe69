"""Attention structural collapse in CLIP fine-tuning: the study's library."""

__version__ = "0.1.0"
