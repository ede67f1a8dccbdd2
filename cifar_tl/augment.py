"""Batched augmentation and preprocessing on the training device.

Batches arrive as uint8 [B, 3, H, W] (H = the stored size, 32 for CIFAR). One `grid_sample` per batch does
the random shift, zoom, horizontal flip *and* the resize to the model's input size, so upscaling 32 -> 224
costs one kernel on the GPU instead of per-image PIL work in a loader.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def _stats(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: from Python lists, every batch would pay a blocking host-to-GPU copy
    return tuple(torch.tensor(v, device=device, dtype=dtype).view(1, -1, 1, 1) for v in (mean, std))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    # while torch.compile / torch.export trace, tensors made here are the tracer's: never cache those
    make = _stats.__wrapped__ if torch.compiler.is_compiling() else _stats
    mean, std = make(tuple(mean), tuple(std), x.device, x.dtype)
    return (x - mean) / std


def _float_resized(images: torch.Tensor, size: int) -> torch.Tensor:
    x = images.float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1])
    return x


def eval_transform(images: torch.Tensor, size: int, mean, std, channels_last: bool = True) -> torch.Tensor:
    """uint8 batch -> normalised float batch at the model's input size (bilinear, as recorded in configs)."""
    x = normalize(_float_resized(images, size), mean, std)
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


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator | None = None,
                     flip: torch.Tensor | None = None) -> torch.Tensor:
    """The classic CIFAR augmentation without resampling: each image moves by a whole number of pixels
    (up to `pad`, borders reflected) and flips with probability 1/2 (or where the bool mask `flip` says). One
    gather cuts every window out: no per-shift loop, so no host sync on a GPU (and 1.6x faster than that loop
    on 2 CPU cores)."""
    b, c, h, w = x.shape
    opts = {"device": x.device, "generator": generator}
    flip = torch.rand(b, **opts) < 0.5 if flip is None else flip
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if pad == 0:
        return x
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), **opts)
    rows = (torch.arange(h, device=x.device) + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def random_cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017, as airbench96 does it): each image loses one `size` x `size` square, placed
    at random wholly inside it, filled with 0 (the mean colour once normalised). One mask for the batch, no loop."""
    b, _, h, w = x.shape
    opts = {"device": x.device, "generator": generator}
    top = torch.randint(0, h - size + 1, (b, 1, 1, 1), **opts)
    left = torch.randint(0, w - size + 1, (b, 1, 1, 1), **opts)
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1) - top
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w) - left
    return x.masked_fill((rows >= 0) & (rows < size) & (cols >= 0) & (cols < size), 0)


def rand_augment(images: torch.Tensor, chunks: int = 8) -> torch.Tensor:
    """torchvision RandAugment on uint8 batches; each chunk of the batch draws its own ops, which keeps the
    work batched while still varying the policy across the batch."""
    from torchvision.transforms import v2

    ra = v2.RandAugment()
    return torch.cat([ra(c) for c in images.chunk(chunks)])


def alternating_flip_mask(images: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's derandomised flip: each image is mirrored in every other epoch, a fixed random half of the
    images in odd epochs and the other half in even ones, so two consecutive epochs always show both
    orientations (random flips repeat one orientation half the time). The fixed per-image coin is the parity
    of the image's pixel sum: a property of the uint8 image itself, so no index has to travel with the batch."""
    coin = images.sum(dim=tuple(range(1, images.ndim)), dtype=torch.int64) % 2 == 1
    return coin ^ (epoch % 2 == 1)


def size_multiple(size: int) -> int:
    """The step progressive resizing grows in: 8 px for CIFAR-sized inputs (our CNNs pool three times), 32 px for
    ImageNet-sized ones (a stride-32 network then sees whole feature maps)."""
    return 8 if size <= 64 else 32


def progressive_size(fraction: float, start: int, end: int, multiple: int = 32) -> int:
    """Progressive resizing (fast.ai's, EfficientNetV2's): the training side after `fraction` (0..1) of the
    run, growing linearly from `start` to `end`, rounded to the nearest multiple of `multiple` (few distinct
    sizes keep cuDNN's tuning and one CUDA graph per size cheap) and clamped to [start, end]. Small early
    epochs cost a fraction of a full-size one; the last ones train at the size the model is tested at."""
    if not 0 < start <= end:
        raise ValueError(f"progressive resizing needs 0 < start <= end; got {start}, {end}")
    if fraction >= 1.0:
        return end
    exact = start + (end - start) * max(0.0, fraction)
    return min(end, max(start, multiple * round(exact / multiple)))


class TrainTransform:
    """uint8 batch -> augmented, resized, normalised float batch. With `alternating_flip` (crop only) or
    progressive resizing, call `set_epoch` at the start of each epoch (with the epoch's training size)."""

    def __init__(self, size: int, mean, std, *, augment: str = "basic", shift: float = 0.125,
                 zoom: float = 0.1, channels_last: bool = True, alternating_flip: bool = False,
                 cutout: int = 0):
        self.size, self.mean, self.std = size, mean, std
        self.augment, self.shift, self.zoom, self.channels_last = augment, shift, zoom, channels_last
        self.alternating_flip, self.epoch, self.cutout = alternating_flip, 1, cutout

    def set_epoch(self, epoch: int, size: int | None = None) -> None:
        self.epoch = epoch
        if size is not None:
            self.size = size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment in ("none", "crop"):
            x = normalize(_float_resized(images, self.size), self.mean, self.std)
            if self.augment == "crop":
                flip = alternating_flip_mask(images, self.epoch) if self.alternating_flip else None
                x = random_crop_flip(x, round(self.shift * self.size), flip=flip)
                if self.cutout:
                    x = random_cutout(x, self.cutout)
        else:
            if self.augment == "randaugment":
                images = rand_augment(images)
            x = random_affine_resize(images.float().div_(255), self.size, self.shift, self.zoom)
            x = normalize(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
