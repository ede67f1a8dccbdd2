"""Metrics over fine and coarse labels, computed with torchmetrics from gathered logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

from .inference import coarse_probs


@torch.no_grad()
def collect_logits(model, loader, transform, accelerator, tta: bool = False) -> dict[str, torch.Tensor]:
    """Run `model` over `loader` on every process; gather_for_metrics drops the sampler's padding, so the
    result holds each sample exactly once, in order."""
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        x = transform(batch["image"])
        with accelerator.autocast():
            logits = model(x).float()
            if tta:
                logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        tensors = {"logits": logits, **{k: batch[k] for k in ("fine", "coarse") if k in batch}}
        for key, value in accelerator.gather_for_metrics(tensors).items():
            outs.setdefault(key, []).append(value.cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


def compute_metrics(logits: torch.Tensor, fine: torch.Tensor, *, fine_names: list[str],
                    coarse: torch.Tensor | None = None, coarse_names: list[str] | None = None,
                    fine_to_coarse: list[int] | None = None) -> dict:
    """top1/top5/loss/ece over fine classes, per-class accuracy, and superclass accuracy from summed fine
    probabilities when coarse labels exist."""
    if len(fine) == 0:
        raise ValueError("cannot evaluate an empty split")
    n = len(fine_names)
    logits = logits.float()
    probs = logits.softmax(-1)
    metrics = {
        "n": int(len(fine)),
        "top1": float(multiclass_accuracy(logits, fine, n, average="micro", top_k=1)),
        "top5": float(multiclass_accuracy(logits, fine, n, average="micro", top_k=min(5, n))),
        "loss": float(F.cross_entropy(logits, fine)),
        "ece": float(multiclass_calibration_error(probs, fine, n, n_bins=15, norm="l1")),
    }
    per_class = multiclass_accuracy(logits, fine, n, average=None)
    present = torch.bincount(fine, minlength=n) > 0
    metrics["per_class"] = {name: float(acc) for name, acc, ok in zip(fine_names, per_class, present) if ok}
    if coarse is not None and coarse_names and fine_to_coarse:
        c = len(coarse_names)
        cprobs = coarse_probs(probs, fine_to_coarse, c)
        metrics["coarse_top1"] = float(multiclass_accuracy(cprobs, coarse, c, average="micro"))
        per_super = multiclass_accuracy(cprobs, coarse, c, average=None)
        present_c = torch.bincount(coarse, minlength=c) > 0
        metrics["per_superclass"] = {name: float(a) for name, a, ok in zip(coarse_names, per_super, present_c)
                                     if ok}
    return metrics
