"""Capture of the [CLS] query row of every vision self-attention layer.

transformers 5 returns an empty tuple for ``output_attentions`` under sdpa, so we compute the
one row we need ourselves: forward hooks on each vision layer's ``q_proj`` and ``k_proj`` keep
the [CLS] query and the keys the attention itself used, and ``softmax(q_cls · Kᵀ · scale)`` is
evaluated from them. Nothing is projected twice (an earlier pre-hook that recomputed K cost
about 12 % of a ViT-B/32 step; see benchmarks.md). It works under sdpa and eager, with or
without LoRA (the hooked projections are then the PEFT layers, adapters and dropout mask
included), and stays differentiable so the regularizers can back-propagate through it.
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
    """Forward hooks on every vision layer's ``q_proj`` and ``k_proj``, registered once.

    While ``enabled``, each forward of the model keeps the [CLS] query and the keys;
    :attr:`tensor` (or :meth:`take`, which also lets them go) turns them into the [CLS] rows.
    A training run builds one for its whole life and enables it around each step's forward,
    so the hooks are found and registered once, and ``torch.compile`` traces them as part of
    the model (the flag is a guard: the compiled step always runs with it on)."""

    def __init__(self, model: nn.Module, enabled: bool = False):
        self._modules = vision_attention_modules(model)
        self.enabled = enabled
        self._q_cls: list[Tensor | None] = [None] * len(self._modules)
        self._keys: list[Tensor | None] = [None] * len(self._modules)
        self._handles = []
        for index, module in enumerate(self._modules):
            self._handles.append(
                module.q_proj.register_forward_hook(self._keeper(self._q_cls, index, 1))
            )
            self._handles.append(
                module.k_proj.register_forward_hook(self._keeper(self._keys, index))
            )

    def _keeper(self, store: list, index: int, tokens: int | None = None):
        def keep(module, args, output):
            if self.enabled:
                store[index] = output if tokens is None else output[:, :tokens]

        return keep

    @property
    def tensor(self) -> Tensor:
        """(images, layers, heads, tokens) [CLS] attention of the last forward (≥ float32)."""
        if any(k is None for k in self._keys) or any(q is None for q in self._q_cls):
            raise RuntimeError("no forward pass ran inside capture_cls_attention")
        rows = [
            _cls_row(module, q, k)
            for module, q, k in zip(self._modules, self._q_cls, self._keys, strict=True)
        ]
        return torch.stack(rows, dim=1)

    def take(self) -> Tensor:
        """:attr:`tensor`, then drop the kept projections (their memory goes with the step)."""
        rows = self.tensor
        self._q_cls[:] = [None] * len(self._modules)
        self._keys[:] = [None] * len(self._modules)
        return rows

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _cls_row(module: nn.Module, q_cls: Tensor, keys: Tensor) -> Tensor:
    """softmax(q_cls·Kᵀ·scale) for one layer from its projections.
    q_cls: (B, 1, D), keys: (B, T, D) → (B, heads, T), at least float32."""
    batch, tokens, _ = keys.shape
    heads, head_dim = module.num_heads, module.head_dim
    q = q_cls.view(batch, 1, heads, head_dim).transpose(1, 2)
    k = keys.view(batch, tokens, heads, head_dim).transpose(1, 2)
    # At least float32: under bf16/fp16 autocast the softmax of a peaked row loses the tail.
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)).squeeze(-2) * module.scale
    return scores.softmax(dim=-1)


@contextmanager
def capture_cls_attention(model: nn.Module) -> Iterator[ClsAttention]:
    """Within the block, every forward of ``model`` records each vision layer's [CLS] query and
    keys; ``.tensor`` turns them into the [CLS] attention rows.

    >>> with capture_cls_attention(classifier) as cap:
    ...     classifier(pixels)
    >>> cap.tensor.shape   # (images, layers, heads, tokens)
    """
    captured = ClsAttention(model, enabled=True)
    try:
        yield captured
    finally:
        captured.remove()
