"""Measurement: the [CLS]-attention capture, the four metrics and the attention regularizers."""
