"""The report's PNG plots. Each function draws one figure from plain data and writes it to `path`.

Figures are built with `matplotlib.figure.Figure` (rendered by the Agg backend when saved), never pyplot,
so no display, global state or backend choice is involved and plots can be drawn from any thread."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from .files import atomic_path

CORRECT, WRONG = "#1a7f37", "#cf222e"
DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:  # a full disk: one line naming the plot, no torn PNG left
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def training_curves(history: pd.DataFrame, path: Path, best_epoch: int | None = None) -> Path:
    """Loss and top-1 accuracy per epoch, train vs validation, from history.jsonl rows; the best epoch
    (lowest validation loss, whose weights were restored) is marked. A run without a validation split has train
    curves only, and keeps its last epoch."""
    validated = "val_loss" in history and history["val_loss"].notna().any()
    if best_epoch is None:
        best_epoch = int(history.loc[history["val_loss"].idxmin() if validated else history.index[-1], "epoch"])
    fig = Figure(figsize=(12, 4.5))
    panels = [("loss", "Cross-entropy loss", "train_loss", "val_loss"),
              ("top-1 accuracy", "Top-1 accuracy", "train_top1", "val_top1")]
    for ax, (name, ylabel, train_col, val_col) in zip(fig.subplots(1, 2), panels):
        ax.plot(history["epoch"], history[train_col], "o-", label=f"train {name}")
        shown = val_col if validated else train_col
        if validated:
            ax.plot(history["epoch"], history[val_col], "s-", label=f"validation {name}")
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"{'best' if validated else 'last'} epoch "
                   f"({best_epoch})")
        best = history.loc[history["epoch"] == best_epoch, shown]
        if len(best):
            ax.plot([best_epoch], [best.iloc[0]], "*", color="black", markersize=14)
        ax.set(title=f"{ylabel} per epoch", xlabel="epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    kept = (f"best weights from epoch {best_epoch} restored" if validated else
            "no validation split: the last epoch's weights")
    fig.suptitle(f"Training curves ({len(history)} epochs; {kept})")
    return _save(fig, path)


def confusion(matrix: torch.Tensor, names: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (each row: where the images of one true class went), in percent; a class
    with no test images (a small sample) gets a grey row marked "–", not a 0 % that reads as all wrong."""
    counts = matrix.double().numpy()
    seen = counts.sum(1) > 0
    share = 100 * counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(names)
    side = max(6.0, 0.45 * k + 3)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_array(share, ~seen[:, None].repeat(len(seen), 1)),
                      cmap=colormaps["Blues"].with_extremes(bad="0.85"), vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    ax.set_xticks(range(k), names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(k):  # label the cells that matter: the diagonal and mistakes of 1% or more
        if not seen[i]:
            ax.text(i, i, "–", ha="center", va="center", fontsize=7)
            continue
        for j in range(k):
            if share[i, j] >= 1 or i == j:
                ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 50 else "black")
    return _save(fig, path)


def top_confusions(pairs: pd.DataFrame, path: Path) -> Path:
    """Horizontal bars: the most frequent 'true -> predicted' fine-class mistakes."""
    pairs = pairs.iloc[::-1]  # largest at the top
    fig = Figure(figsize=(9, 0.38 * len(pairs) + 1.5))
    ax = fig.subplots()
    labels = [f"{t} \u2192 {p}" for t, p in zip(pairs["true"], pairs["predicted"])]
    bars = ax.barh(labels, pairs["count"], color=WRONG, alpha=0.8)
    ax.bar_label(bars, [f"{c} ({s:.0%})" for c, s in zip(pairs["count"], pairs["share"])], padding=3,
                 fontsize=8)
    ax.set(title="Most confused fine-class pairs (true \u2192 predicted)",
           xlabel="test images (share of the true class)")
    ax.margins(x=0.15)
    return _save(fig, path)


def prediction_grid(images: torch.Tensor, true: list[str], pred: list[str], path: Path, split: str = "test",
                    cols: int = 6) -> Path:
    """Images (uint8 [N, 3, H, W]) titled with predicted and true labels: green when right, red when wrong."""
    rows = int(np.ceil(len(images) / cols))
    fig = Figure(figsize=(2.2 * cols, 2.5 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).flatten()
    for ax in axes:
        ax.set(xticks=[], yticks=[])  # no ticks at all: hidden ones still cost layout time per axes
        ax.set_axis_off()
    for ax, image, t, p in zip(axes, images, true, pred):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"pred: {p}\ntrue: {t}", fontsize=9, color=CORRECT if t == p else WRONG)
    right = sum(t == p for t, p in zip(true, pred))
    fig.suptitle(f"{split.capitalize()} images: predicted vs true label ({right}/{len(true)} right; "
                 "green = right, red = wrong)")
    return _save(fig, path)


def reliability(bins: pd.DataFrame, ece: float, path: Path) -> Path:
    """Reliability diagram: accuracy vs confidence per bin (gaps to the diagonal shaded) over a histogram of
    how many predictions fall in each bin."""
    fig = Figure(figsize=(6.5, 7.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins["upper"] - bins["lower"]
    used = bins["count"] > 0
    centres = (bins["lower"] + width / 2)[used]
    top.bar(centres, bins["accuracy"][used], width=width[used], color="#4c72b0", edgecolor="black",
            label="accuracy")
    top.bar(centres, (bins["confidence"] - bins["accuracy"])[used], bottom=bins["accuracy"][used],
            width=width[used], color=WRONG, alpha=0.3, edgecolor=WRONG, hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
            title=f"Reliability diagram (ECE = {ece:.4f}, {len(bins)} bins)")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(bins["lower"] + width / 2, bins["count"], width=width, color="grey", edgecolor="black")
    bottom.set(xlabel="confidence (top-1 probability)", ylabel="predictions")
    return _save(fig, path)
