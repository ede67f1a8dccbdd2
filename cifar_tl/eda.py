"""Exploratory data analysis: `python -m cifar_tl.eda --dataset ... --output-dir DIR` writes
class_balance.csv (fine/coarse name and count per split), summary.json (sizes, classes, image size,
duplicates, unreadable rows) and samples.png (a labelled grid)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .console import FlagParser, error_line

if TYPE_CHECKING:  # torch and datasets take seconds to import: --help and a bad flag answer without them
    from .sources import RawDataset


def class_balance(raw: RawDataset) -> pd.DataFrame:
    frame = pd.DataFrame({"fine_label": range(len(raw.fine_names)), "fine_name": raw.fine_names})
    if raw.coarse_names and raw.fine_to_coarse:
        frame["coarse_name"] = [raw.coarse_names[c] if c >= 0 else None for c in raw.fine_to_coarse]
    for name, split in raw.splits.items():
        frame[name] = np.bincount(split.fine.numpy(), minlength=len(raw.fine_names))
    return frame


def duplicates(raw: RawDataset) -> dict:
    """Exact pixel duplicates within each split and between splits (train/test leakage)."""
    seen: dict[str, set[str]] = {}
    out = {}
    for name, split in raw.splits.items():
        digests = [hashlib.blake2b(img.numpy().tobytes(), digest_size=12).hexdigest() for img in split.images]
        out[f"within_{name}"] = len(digests) - len(set(digests))
        seen[name] = set(digests)
    names = sorted(seen)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"between_{a}_{b}"] = len(seen[a] & seen[b])
    return out


def summary(raw: RawDataset, balance: pd.DataFrame) -> dict:
    first = next(iter(raw.splits.values()))
    counts = {name: balance[name].describe()[["min", "max", "mean"]].round(2).to_dict() for name in raw.splits}
    return {
        "source": raw.source,
        "fingerprint": raw.fingerprint,
        "sizes": {name: len(split) for name, split in raw.splits.items()},
        "num_fine_classes": len(raw.fine_names),
        "num_coarse_classes": len(raw.coarse_names) if raw.coarse_names else 0,
        "image_shape": list(first.images.shape[1:]),
        "image_dtype": "uint8 RGB",
        "images_per_class": counts,
        "balanced": all(balance[name].nunique() == 1 for name in raw.splits),
        "duplicates": duplicates(raw),
        "unreadable_rows": raw.unreadable,
    }


def sample_grid(raw: RawDataset, path: Path, split: str = "train", n: int = 40, seed: int = 0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = raw.splits[split]
    idx = np.random.default_rng(seed).choice(len(data), size=min(n, len(data)), replace=False)
    cols = 8
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, i in zip(np.atleast_1d(axes).ravel(), idx):
        fine = int(data.fine[i])
        title = raw.fine_names[fine]
        if data.coarse is not None and raw.coarse_names:
            title += f"\n({raw.coarse_names[int(data.coarse[i])]})"
        ax.imshow(data.images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"{raw.source} — {split} samples (fine label, superclass)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m cifar_tl.eda", description=" ".join(__doc__.split()))
    parser.add_argument("--dataset", default="uoft-cs/cifar100")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--image-column")
    parser.add_argument("--label-column")
    parser.add_argument("--coarse-label-column")
    parser.add_argument("--splits", nargs="+", help="default: train and test, or the splits the source has")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    from .data import load_raw
    from .files import not_a_folder
    from .sources import DataError, MissingSplitError

    blocked = not_a_folder(out)
    if blocked:
        return error_line(f"--output-dir {out}: {blocked}")

    def load(splits: list[str]):
        return load_raw(args.dataset, image_column=args.image_column, label_column=args.label_column,
                        coarse_label_column=args.coarse_label_column, splits=tuple(splits), skip_unreadable=True)

    splits = args.splits or ["train", "test"]
    try:
        try:
            raw = load(splits)
        except MissingSplitError as err:
            if args.splits or not err.have:
                raise DataError(f"--dataset {args.dataset}: has no split {err.split!r} (it has "
                                f"{', '.join(err.have) or 'none'}); choose with --splits") from None
            splits = err.have  # no --splits: whatever the source has (a test-only set, a folder of class folders)
            raw = load(splits)
    except DataError as err:
        return error_line(err)
    balance = class_balance(raw)
    out.mkdir(parents=True, exist_ok=True)
    balance.to_csv(out / "class_balance.csv", index=False)
    info = summary(raw, balance)
    (out / "summary.json").write_text(json.dumps(info, indent=2) + "\n")
    sample_grid(raw, out / "samples.png", split=splits[0])
    print(json.dumps({k: info[k] for k in ("sizes", "num_fine_classes", "num_coarse_classes", "duplicates",
                                           "unreadable_rows")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
