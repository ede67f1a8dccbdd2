"""The Keras-style model summary every run prints at its start and saves as `OUTPUT_DIR/model_summary.txt`
(torchinfo's table: layer, output shape, parameters, trainable), and the parameter totals as Keras reports them,
which the model card shows.

Keras counts BatchNormalization's moving mean and variance as non-trainable weights; in PyTorch they are
buffers, which torchinfo and `model.parameters()` leave out. `parameter_counts` adds them back, so
EfficientNet-B0 with a 100-class head counts 4,177,664 total / 4,135,648 trainable / 42,016 non-trainable,
exactly the study's Keras summary. Frozen parameters (requires_grad=False) are non-trainable in both."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write_text

_COUNT_UNITS = {"NONE": "", "KILOBYTES": "thousands", "MEGABYTES": "millions", "GIGABYTES": "billions",
                "TERABYTES": "trillions"}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable", "non_trainable"} as Keras counts them: parameters plus BatchNorm running
    statistics; non-trainable = frozen parameters + those statistics."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = sum(m.running_mean.numel() + m.running_var.numel() for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None)
    return {"total": params + stats, "trainable": trainable, "non_trainable": params - trainable + stats}


def model_summary(model: nn.Module, image_size: int, depth: int = 2) -> str:
    """torchinfo's table for one `image_size` image, followed by the Keras-style totals. It runs one forward pass
    in eval mode without gradients, on the device the model is on (torchinfo would otherwise move the model to
    CUDA in place); the model's train/eval mode is restored and BatchNorm statistics are not touched."""
    import torchinfo

    device = next(model.parameters()).device
    stats = torchinfo.summary(model, input_size=(1, 3, image_size, image_size),
                              col_names=("output_size", "num_params", "trainable"), row_settings=("var_names",),
                              depth=depth, device=device, mode="eval", verbose=0)
    counts = parameter_counts(model)
    # torchinfo 1.8 on Python >= 3.11 prints the mult-adds unit as "(Units.MEGABYTES)": it is a count (millions)
    table = re.sub(r"\(Units\.(\w+)\)", lambda m: f"({_COUNT_UNITS.get(m[1], m[1].lower())})", str(stats))
    return (f"{table}\nAs Keras counts them (BatchNorm moving mean and variance are non-trainable weights):\n"
            f"Total params: {counts['total']:,}\nTrainable params: {counts['trainable']:,}\n"
            f"Non-trainable params: {counts['non_trainable']:,}\n")


def write_summary(model: nn.Module, image_size: int, path: Path) -> str:
    """The summary, written to `path`; returns its text."""
    with torch.no_grad():
        text = model_summary(model, image_size)
    atomic_write_text(path, text)
    return text
