"""Depthwise convolutions on small feature maps, computed as one matrix product per channel.

On a CPU, PyTorch's depthwise-convolution backward is slow on the small maps an EfficientNet's last stages see:
Lite0's 5x5 depthwise convs on 4x4 maps (batch 128) took 126 ms per backward call on 2 AVX2 cores, half of the
probe's training step. On an HxW map each output pixel of a channel is a fixed linear function of that
channel's H*W inputs, so the convolution is one (Ho*Wo x H*W) matrix per channel, built from the kernel by an
index table: a batched matmul, fast forward and backward (the probe's step: 1.65x, bench/cpu_step.py). Where
H*W is large the matrices grow quadratically, so only maps of at most `max_pixels` pixels are converted."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from torch import nn


class DepthwiseMatmul(nn.Module):
    """`conv` (depthwise, zero padding, TF 'same' padding included) on `hw`-sized inputs as per-channel matrix
    products. It holds the conv's own parameters under the same names, so state_dict keys and optimiser state
    are unchanged; inputs of another size go through the conv itself."""

    def __init__(self, conv: nn.Conv2d, hw: tuple[int, int]):
        super().__init__()
        self.weight, self.bias, self.hw, self._conv = conv.weight, conv.bias, tuple(hw), (conv,)
        h, w = hw
        # number each input pixel (0 = padding), pad and unfold it as the conv would: tap t of output pixel l
        # reads input pixel taps[t, l] - 1
        pos = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w)
        pos = (pad_same(pos, conv.kernel_size, conv.stride, conv.dilation) if isinstance(conv, Conv2dSame)
               else F.pad(pos, (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])))
        taps = F.unfold(pos, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)[0].long()
        self.out_hw = tuple((pos.shape[2 + i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
                            for i in (0, 1))
        self.register_buffer("onehot", F.one_hot(taps, h * w + 1)[..., 1:].float(), persistent=False)  # (T, L, HW)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.hw:
            return self._conv[0](x)
        matrices = torch.einsum("ct,tlq->clq", self.weight.flatten(1), self.onehot.to(self.weight.dtype))
        out = torch.einsum("clq,bcq->bcl", matrices, x.flatten(2))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        return out.view(x.shape[0], x.shape[1], *self.out_hw)


def _convertible(m: nn.Module) -> bool:
    return (type(m) in (nn.Conv2d, Conv2dSame) and m.groups == m.in_channels == m.out_channels
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


@contextmanager
def as_matmul(module: nn.Module, sample: torch.Tensor, max_pixels: int = 64):
    """Within the block, the depthwise convs of `module` whose inputs (as `sample` passes through, in eval mode,
    without gradients) have at most `max_pixels` pixels compute as `DepthwiseMatmul`; restored on exit."""
    sizes = {}

    def record(name):
        def hook(_module, args):  # returns None: the inputs pass unchanged
            sizes[name] = tuple(args[0].shape[-2:])
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in module.named_modules() if _convertible(m)]
    training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(sample)
    finally:
        module.train(training)
        for h in hooks:
            h.remove()
    swapped = []
    for name, hw in sizes.items():
        if hw[0] * hw[1] <= max_pixels:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name)
            conv = getattr(parent, attr)
            setattr(parent, attr, DepthwiseMatmul(conv, hw).to(conv.weight.device))
            swapped.append((parent, attr, conv))
    try:
        yield len(swapped)
    finally:
        for parent, attr, conv in swapped:
            setattr(parent, attr, conv)
