"""`report.md`: the headline table (also reused by the Hub model card) and the plots of one evaluated split.

Written by `python -m cifar_tl.evaluate` and at the end of every training run, next to `metrics.json`:

    OUT/report.md
    OUT/plots/{training_curves,confusion,top_confusions,predictions,reliability}.png
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from . import plots
from .data import DatasetBundle, coarse_probs
from .files import atomic_write_text, read_jsonl
from .metrics import confusion_matrix, reliability_bins, top_confused_pairs

GRID_IMAGES = 24
TOP_PAIRS = 15
MAX_MATRIX_CLASSES = 30
PLOTS = ("training_curves", "confusion", "top_confusions", "predictions", "reliability")


def headline(metrics: dict, n_worst: int = 10) -> dict:
    """The numbers every summary shows: fine top-1/top-5, coarse top-1 (when known), ECE, loss, n and the
    `n_worst` classes by accuracy (needs `per_class`, as in eval_details.json or evaluate's metrics.json)."""
    out = {k: metrics[k] for k in ("top1", "top5", "coarse_top1", "ece", "loss", "n") if k in metrics}
    per_class = metrics.get("per_class") or {}
    out["worst_classes"] = sorted(per_class.items(), key=lambda item: (item[1], item[0]))[:n_worst]
    return out


def headline_markdown(metrics: dict, tta: dict | None = None, n_worst: int = 10) -> str:
    """Markdown: the headline metrics (with a TTA column when given) and the worst classes table."""
    rows = [("fine top-1", "top1", _percent_text), ("fine top-5", "top5", _percent_text), ("coarse top-1 (superclass)",
            "coarse_top1", _percent_text), ("ECE (15 bins)", "ece", "{:.4f}".format), ("loss (cross-entropy)", "loss",
            "{:.4f}".format), ("images", "n", str)]
    header = ["metric", "plain"] + (["flip TTA"] if tta else [])
    columns = [m for m in (metrics, tta) if m]
    body = [[label] + [fmt(m[key]) for m in columns] for label, key, fmt in rows if key in metrics]
    text = _table(header, body)
    worst = headline(metrics, n_worst)["worst_classes"]
    if worst:
        text += f"\n\n**Worst {len(worst)} classes** (top-1 accuracy, plain):\n\n"
        text += _table(["class", "accuracy"], [[name, _percent_text(acc)] for name, acc in worst])
    supers = sorted((metrics.get("per_superclass") or {}).items(), key=lambda item: (item[1], item[0]))
    if supers:  # the study's question: which superclasses does the model confuse
        text += "\n\n**Superclasses, weakest first** (superclass top-1 accuracy, plain):\n\n"
        text += _table(["superclass", "accuracy"], [[name, _percent_text(acc)] for name, acc in supers])
    return text


def write_report(out_dir: str | Path, *, results: dict[str, dict], logits: torch.Tensor,
                 bundle: DatasetBundle, split: str = "test", info: dict[str, object],
                 history: str | Path | None = None, best_epoch: int | None = None) -> Path:
    """Draw the plots of `split` from its plain `logits` (in the dataset's class order and sample order) and
    write OUT/report.md. `results` = {"plain": metrics, "tta": metrics (optional)}; `info` rows head the
    report (model, dataset, ...); `history` is a history.jsonl for the training curves."""
    out = Path(out_dir)
    data = getattr(bundle, split)
    if len(logits) != len(data):
        raise ValueError(f"{len(logits)} logits for the {len(data)} images of the {split} split")
    probs = logits.float().softmax(-1)
    for stale in PLOTS:  # an earlier report in this folder may have drawn plots this one does not
        (out / "plots" / f"{stale}.png").unlink(missing_ok=True)
    epochs = read_jsonl(history) if history else []  # a torn last line (a full disk) is skipped
    sections = [
        *([_curves(out, epochs, Path(history).name, best_epoch)] if epochs else []),
        *_confusions(out, probs, data, bundle),
        _predictions(out, probs, data, bundle, split),
        _section("Calibration", plots.reliability(reliability_bins(probs, data.fine), results["plain"]["ece"],
                                                  out / "plots" / "reliability.png"),
                 "Accuracy against confidence in 15 equal-width bins: bars below the diagonal mean "
                 "over-confidence, above it under-confidence."),
    ]
    header = _table(["", ""], [[k, f"`{v}`" if k in ("model", "dataset", "dataset fingerprint") else str(v)]
                               for k, v in info.items()])
    tta_note = ("\nFlip TTA averages the logits of each image and its horizontal mirror; the plots use plain "
                "predictions.\n" if "tta" in results else "")
    table = headline_markdown(results["plain"], results.get("tta"))
    text = f"# Evaluation report\n\n{header}\n\n## Headline\n\n{table}\n{tta_note}\n" + "\n".join(sections)
    path = out / "report.md"
    atomic_write_text(path, text)
    return path


def _section(title: str, png: Path, caption: str) -> str:
    return f"## {title}\n\n![{title}](plots/{png.name})\n\n{caption}\n"


def _curves(out: Path, epochs: list[dict], name: str, best_epoch: int | None) -> str:
    png = plots.training_curves(pd.DataFrame(epochs), out / "plots" / "training_curves.png", best_epoch)
    kept = ("the dashed line marks the epoch with the lowest validation loss, whose weights were kept" if
            any("val_loss" in e for e in epochs) else "no validation split: the last epoch's weights were kept")
    return _section("Training curves", png, f"Loss and top-1 accuracy per epoch from `{name}`; {kept}.")


def _confusions(out: Path, probs: torch.Tensor, data, bundle: DatasetBundle) -> list[str]:
    """The superclass confusion matrix (or the fine one when it is small enough to read) and the most confused
    fine pairs."""
    sections = []
    fine_cm = confusion_matrix(probs, data.fine, bundle.num_classes)
    if bundle.has_coarse:
        k = len(bundle.coarse_names)
        cprobs = coarse_probs(probs, bundle.fine_to_coarse, k)
        png = plots.confusion(confusion_matrix(cprobs, data.coarse, k), bundle.coarse_names,
                              out / "plots" / "confusion.png",
                              f"Superclass confusion ({k} superclasses, % of each true row)")
        sections.append(_section("Superclass confusion", png, ("Superclass predictions come from the fine "
                                 "probabilities summed per superclass; rows are the true superclass.")))
    elif bundle.num_classes <= MAX_MATRIX_CLASSES:  # a larger matrix is unreadable: the pairs plot remains
        png = plots.confusion(fine_cm, bundle.fine_names, out / "plots" / "confusion.png",
                              f"Confusion matrix ({bundle.num_classes} classes, % of each true row)")
        sections.append(_section("Confusion matrix", png, "Rows are the true class (this dataset has no "
                                 "superclass labels)."))
    pairs = top_confused_pairs(fine_cm, bundle.fine_names, TOP_PAIRS)
    if len(pairs):
        png = plots.top_confusions(pairs, out / "plots" / "top_confusions.png")
        sections.append(_section("Most confused fine classes", png, "The most frequent mistakes, with their "
                                 "share of the true class's images."))
    return sections


def _predictions(out: Path, probs: torch.Tensor, data, bundle: DatasetBundle, split: str) -> str:
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:GRID_IMAGES]
    pred = probs.argmax(-1)
    png = plots.prediction_grid(data.images[pick], [bundle.fine_names[i] for i in data.fine[pick].tolist()],
                                [bundle.fine_names[i] for i in pred[pick].tolist()],
                                out / "plots" / "predictions.png", split)
    return _section("Sample predictions", png, (f"{len(pick)} {split} images drawn at random (seed 0): "
                                                "predicted and true label, green when right, red when wrong."))


def _percent_text(value: float) -> str:
    return f"{100 * value:.2f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])
