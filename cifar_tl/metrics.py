"""Metrics from logits and labels (no model, no data loading): fine and coarse accuracy, calibration and
per-class scores computed with torchmetrics, the tables the plots and the report are drawn from (confusion
pairs, calibration bins), and the model-to-dataset label alignment (`--label-map`)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
)

from .data import coarse_probs

ECE_BINS = 15


class EvaluationError(ValueError):
    """The evaluation cannot run as asked (labels do not match, empty split); the message says what to do."""


def compute_metrics(logits: torch.Tensor, fine: torch.Tensor, *, fine_names: list[str],
                    coarse: torch.Tensor | None = None, coarse_names: list[str] | None = None,
                    fine_to_coarse: list[int] | None = None) -> dict:
    """top1/top5 (over 5 classes)/loss/ece over fine classes, per-class accuracy, and superclass accuracy from summed fine
    probabilities when coarse labels exist."""
    if len(fine) == 0:
        raise EvaluationError("cannot evaluate an empty split")
    n = len(fine_names)
    logits = logits.float()
    probs = logits.softmax(-1)
    metrics = {
        "n": len(fine),
        "top1": float(multiclass_accuracy(logits, fine, n, average="micro", top_k=1)),
        "loss": float(F.cross_entropy(logits, fine)),
        "ece": float(multiclass_calibration_error(probs, fine, n, n_bins=ECE_BINS, norm="l1")),
    }
    if n > 5:  # with 5 classes or fewer top-5 is 100 % by construction: not a measurement
        metrics["top5"] = float(multiclass_accuracy(logits, fine, n, average="micro", top_k=5))
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


def confusion_matrix(scores: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [true, predicted] from logits or probabilities (argmax), via torchmetrics."""
    return multiclass_confusion_matrix(scores.float(), target, num_classes)


def top_confused_pairs(matrix: torch.Tensor, names: list[str], k: int = 15) -> pd.DataFrame:
    """The k most frequent (true, predicted) mistakes; `share` = count / images of the true class."""
    off = matrix.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    top = flat.topk(min(k, int((flat > 0).sum()))).indices
    rows = matrix.sum(1)
    c = matrix.shape[1]
    return pd.DataFrame([{"true": names[i // c], "predicted": names[i % c], "count": int(flat[i]),
                          "share": float(flat[i] / rows[i // c])} for i in top.tolist()],
                        columns=["true", "predicted", "count", "share"])


def reliability_bins(probs: torch.Tensor, target: torch.Tensor, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per equal-width confidence bin: count, mean confidence and accuracy of the top-1 prediction (the
    reliability diagram; sum(count / n * |accuracy - confidence|) is the ECE)."""
    confidence, pred = probs.float().max(-1)
    correct = (pred == target).float()
    # torchmetrics' bin edges; a confidence of exactly 1 (a bin of its own there) joins the last bin here
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(max=n_bins - 1)
    frame = pd.DataFrame({"bin": index.numpy(), "confidence": confidence.numpy(), "correct": correct.numpy()})
    stats = frame.groupby("bin").agg(count=("correct", "size"), confidence=("confidence", "mean"),
                                     accuracy=("correct", "mean"))
    stats = stats.reindex(range(n_bins)).fillna({"count": 0}).astype({"count": int})
    stats.insert(0, "lower", [i / n_bins for i in range(n_bins)])
    stats.insert(1, "upper", [(i + 1) / n_bins for i in range(n_bins)])
    return stats.reset_index(drop=True)


def load_label_map(path: str | Path) -> dict[str, str]:
    """`--label-map FILE`: a JSON object {"dataset class name": "model class name", ...}."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--label-map {path}: file not found")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"--label-map {path}: not valid JSON ({err})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in mapping.items()):
        raise EvaluationError(f"--label-map {path}: expected a JSON object of "
                              '{"dataset class name": "model class name"} strings')
    return mapping


def align_labels(model_names: list[str], dataset_names: list[str],
                 label_map: dict[str, str] | None = None) -> list[int]:
    """For each dataset class, the index of the model output that predicts it.

    Without a map the two name lists must hold the same classes (any order; matched by name). With a map,
    each dataset class uses the model class it maps to, or its own name when it is not in the map; the model
    outputs no dataset class uses are dropped, so predictions stay within the dataset's classes."""
    if len(dataset_names) < 2:  # every prediction among one class is right: no accuracy to measure
        raise EvaluationError(f"the dataset shows one class ({_preview(dataset_names)}); metrics need at least two")
    model_index = {name: i for i, name in enumerate(model_names)}
    if label_map is None:
        if set(model_names) != set(dataset_names):
            only_model = sorted(set(model_names) - set(dataset_names))
            only_data = sorted(set(dataset_names) - set(model_names))
            raise EvaluationError(
                f"the model's {len(model_names)} class names do not match the dataset's {len(dataset_names)} "
                f"(only in the model: {_preview(only_model)}; only in the dataset: {_preview(only_data)}); "
                "pass --label-map FILE, a JSON object mapping dataset class name -> model class name")
        return [model_index[name] for name in dataset_names]
    unknown = sorted(set(label_map) - set(dataset_names))
    if unknown:
        raise EvaluationError(f"--label-map: {_preview(unknown)} are not dataset classes "
                              f"(the dataset has {_preview(dataset_names)})")
    targets = [label_map.get(name, name) for name in dataset_names]
    missing = sorted({t for t in targets if t not in model_index})
    if missing:
        raise EvaluationError(f"--label-map: {_preview(missing)} are not model classes "
                              f"(the model has {_preview(model_names)}); map every dataset class to one")
    shared = sorted({t for t in targets if targets.count(t) > 1})
    if shared:
        raise EvaluationError(f"--label-map: several dataset classes map to the same model class "
                              f"{_preview(shared)}")
    return [model_index[t] for t in targets]


def _preview(names: list[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > k else shown or "none"
