"""Test-time augmentation: the logits of a few views of each image, averaged with fixed weights.

Levels follow airbench94's `infer` (Jordan, 2024):
  0: the image alone;
  1: the image and its mirror image, 1/2 each;
  2: level 1 at weight 1/2, plus level 1 of the image shifted by one pixel up-left and by one pixel
     down-right (reflected borders) at 1/4 each: 6 views in all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_LEVEL = 2


def tta_views(x: torch.Tensor, level: int) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs for a normalised batch [B, C, H, W]; the weights sum to 1."""
    if level not in range(MAX_LEVEL + 1):
        raise ValueError(f"TTA level must be 0..{MAX_LEVEL}; got {level}")
    memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format

    def mirror(v: torch.Tensor, weight: float) -> list[tuple[float, torch.Tensor]]:
        if level == 0:
            return [(weight, v)]
        return [(weight / 2, v), (weight / 2, v.flip(-1).contiguous(memory_format=memory_format))]

    if level < 2:
        return mirror(x, 1.0)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]  # content moves down-right / up-left by 1 px
    views = mirror(x, 0.5)
    for v in shifted:
        views += mirror(v.contiguous(memory_format=memory_format), 0.25)
    return views


def multiview_logits(model: torch.nn.Module, x: torch.Tensor, level: int,
                     first: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of the model's fp32 logits over `tta_views(x, level)`. The first view is `x` itself:
    `first`, its logits when the caller already has them (a plain pass's), is used instead of a second forward."""
    out = None
    for i, (weight, view) in enumerate(tta_views(x, level)):
        logits = (first if i == 0 and first is not None else model(view)).float() * weight
        out = logits if out is None else out + logits
    return out
