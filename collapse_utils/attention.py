"""Capture of the [CLS] query row of every vision self-attention layer.

transformers 5 returns an empty tuple for ``output_attentions`` under sdpa, so we recompute the
one row we need: a forward pre-hook on each vision layer's ``self_attn`` sees the layer input
``hidden_states`` and evaluates ``softmax(q_cls · Kᵀ · scale)`` through the module's own
``q_proj``/``k_proj``. That works under sdpa and eager, with or without LoRA (the projections are
then PEFT layers), costs one extra K projection per layer, and stays differentiable so the
regularizers can back-propagate through it.

With LoRA dropout in train mode, the hook's ``q_proj`` call draws its own dropout mask, so a
regularized LoRA step penalises a row computed with a different mask than the forward pass
used (the study regularizes full fine-tuning only; tracking runs in eval mode, no dropout).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_VISION_ATTN = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn$")


def vision_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``self_attn`` module of every vision encoder layer, in layer order."""
    found = {}
    for name, module in model.named_modules():
        match = _VISION_ATTN.search(name)
        if match:
            found[int(match.group(1))] = module
    if not found:
        raise ValueError(
            f"no vision self-attention layers found in {type(model).__name__}; expected modules "
            "named '...vision_model.encoder.layers.<i>.self_attn'"
        )
    return [found[i] for i in sorted(found)]


class ClsAttention:
    """Holds the rows captured during the last forward pass; see :func:`capture_cls_attention`."""

    def __init__(self, n_layers: int):
        self._rows: list[Tensor | None] = [None] * n_layers

    def _store(self, layer: int, row: Tensor) -> None:
        self._rows[layer] = row

    @property
    def tensor(self) -> Tensor:
        """(images, layers, heads, tokens) [CLS] attention of the last forward (≥ float32)."""
        if any(r is None for r in self._rows):
            raise RuntimeError("no forward pass ran inside capture_cls_attention")
        return torch.stack(self._rows, dim=1)


def _cls_row(module: nn.Module, hidden: Tensor) -> Tensor:
    """softmax(q_cls·Kᵀ·scale) for one layer. hidden: (B, T, D) → (B, heads, T), ≥ float32."""
    batch, tokens, _ = hidden.shape
    heads = module.num_heads
    head_dim = module.head_dim
    q = module.q_proj(hidden[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    k = module.k_proj(hidden).view(batch, tokens, heads, head_dim).transpose(1, 2)
    # At least float32: under bf16/fp16 autocast the softmax of a peaked row loses the tail.
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)).squeeze(-2) * module.scale
    return scores.softmax(dim=-1)


@contextmanager
def capture_cls_attention(model: nn.Module) -> Iterator[ClsAttention]:
    """Within the block, every forward of ``model`` records the [CLS] attention row per layer.

    >>> with capture_cls_attention(classifier) as cap:
    ...     classifier(pixels)
    >>> cap.tensor.shape   # (images, layers, heads, tokens)
    """
    modules = vision_attention_modules(model)
    captured = ClsAttention(len(modules))
    handles = []
    for index, module in enumerate(modules):

        def hook(mod, args, kwargs, index=index):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured._store(index, _cls_row(mod, hidden))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
