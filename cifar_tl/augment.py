"""Batched augmentation and preprocessing on the training device.

Batches arrive as uint8 [B, 3, H, W] (H = the stored size, 32 for CIFAR). One `grid_sample` per batch does
the random shift, zoom, horizontal flip *and* the resize to the model's input size, so upscaling 32 -> 224
costs one kernel on the GPU instead of per-image PIL work in a loader.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def eval_transform(images: torch.Tensor, size: int, mean, std, channels_last: bool = True) -> torch.Tensor:
    """uint8 batch -> normalised float batch at the model's input size (bilinear, as recorded in configs)."""
    x = images.float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1])
    x = normalize(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def random_affine_resize(x: torch.Tensor, size: int, shift: float, zoom: float, flip: bool = True,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random translate (fraction `shift` of the side), zoom (1 +- `zoom`) and flip, resampled
    straight to `size` x `size` with reflection at the borders."""
    b = x.shape[0]
    opts = {"device": x.device, "generator": generator}
    scale = 1.0 + (torch.rand(b, **opts) * 2 - 1) * zoom  # > 1 zooms out, < 1 zooms in
    tx, ty = ((torch.rand(2, b, **opts) * 2 - 1) * 2 * shift).unbind(0)  # grid coords span 2 per side
    sign = torch.where(torch.rand(b, **opts) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=x.device)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = scale * sign
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def rand_augment(images: torch.Tensor, chunks: int = 8) -> torch.Tensor:
    """torchvision RandAugment on uint8 batches; each chunk of the batch draws its own ops, which keeps the
    work batched while still varying the policy across the batch."""
    from torchvision.transforms import v2

    ra = v2.RandAugment()
    return torch.cat([ra(c) for c in images.chunk(chunks)])


class TrainTransform:
    """uint8 batch -> augmented, resized, normalised float batch."""

    def __init__(self, size: int, mean, std, *, augment: str = "basic", shift: float = 0.125,
                 zoom: float = 0.1, channels_last: bool = True):
        self.size, self.mean, self.std = size, mean, std
        self.augment, self.shift, self.zoom, self.channels_last = augment, shift, zoom, channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment == "none":
            return eval_transform(images, self.size, self.mean, self.std, self.channels_last)
        if self.augment == "randaugment":
            images = rand_augment(images)
        x = random_affine_resize(images.float().div_(255), self.size, self.shift, self.zoom)
        x = normalize(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
