"""Data layer: any supported source -> a decoded uint8 tensor store -> stratified train/val/test splits.

Sources (detected from `--dataset`):
  * a Hub id (default `uoft-cs/cifar100`) or a local folder of Hub-style parquet files,
  * a `datasets.save_to_disk` folder,
  * the official `cifar-100-python` folder or `cifar-100-python.tar.gz` (pickled train/test/meta),
  * an image folder (`class_name/xxx.png`, optionally under `train/` and `test/`).

Images are decoded once into uint8 tensors [N, 3, H, W] and cached on disk as safetensors, so later runs
start in about a second and the training loop never touches PIL.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from .files import atomic_path

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("fine_label", "label")
COARSE_COLUMNS = ("coarse_label",)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
STORE_VERSION = "1"


class DataError(ValueError):
    """The dataset cannot be used as given; the message names the source, split, column or flag."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    fine: torch.Tensor  # int64 [N]
    coarse: torch.Tensor | None = None  # int64 [N]

    def __len__(self) -> int:
        return len(self.fine)

    def _map(self, fn) -> Split:
        return Split(fn(self.images), fn(self.fine), None if self.coarse is None else fn(self.coarse))

    def subset(self, index: torch.Tensor) -> Split:
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> Split:
        return self._map(lambda t: t.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.images, self.fine, self.coarse) if t is not None)


@dataclass
class RawDataset:
    """All splits of a source, decoded, with the class names the source itself carries."""

    splits: dict[str, Split]
    fine_names: list[str]
    coarse_names: list[str] | None
    fine_to_coarse: list[int] | None
    fingerprint: str
    source: str
    unreadable: dict[str, list[int]] = field(default_factory=dict)  # split -> skipped rows (skip mode only)


@dataclass
class DatasetBundle:
    train: Split
    val: Split
    test: Split
    fine_names: list[str]
    coarse_names: list[str] | None
    fine_to_coarse: list[int] | None
    fingerprint: str
    source: str
    kind: str = ""  # how the source was read: hub, parquet, save-to-disk, cifar-pickle, cifar-tar, imagefolder
    source_sizes: dict[str, int] = field(default_factory=dict)  # images per split of the source, before any split

    @property
    def num_classes(self) -> int:
        return len(self.fine_names)

    def describe(self) -> dict:
        """The data a run used, as the model card states it: the source and how it was read, the images in
        each split the run used (train after --max-train-samples) and in the source's own splits."""
        return {"source": self.source, "kind": self.kind, "fingerprint": self.fingerprint,
                "train": len(self.train), "val": len(self.val), "test": len(self.test),
                "source_sizes": dict(self.source_sizes), "num_classes": self.num_classes,
                "num_coarse": len(self.coarse_names) if self.coarse_names else 0}

    @property
    def has_coarse(self) -> bool:
        return self.coarse_names is not None

    def drop_partial_coarse(self) -> None:
        """Superclass metrics need every fine class mapped; a partial map (unseen classes) disables them."""
        if self.fine_to_coarse is not None and -1 in self.fine_to_coarse:
            log.warning("%s: superclass labels disabled (the fine->coarse map is incomplete)", self.source)
            self.coarse_names = self.fine_to_coarse = None
            for split in (self.train, self.val, self.test):
                split.coarse = None

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


# --------------------------------------------------------------------------------------------- public API


def load_bundle(
    dataset: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    coarse_label_column: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    val_fraction: float = 0.1,
    max_train_samples: int | None = None,
    seed: int = 42,
    cache: bool = True,
) -> DatasetBundle:
    """Load a source and split its train split into stratified train/val; test stays untouched."""
    raw = load_raw(dataset, image_column=image_column, label_column=label_column,
                   coarse_label_column=coarse_label_column, splits=(train_split, test_split), cache=cache)
    train_all, test = raw.splits[train_split], raw.splits[test_split]
    train_idx, val_idx = stratified_split(train_all.fine, val_fraction, seed)
    if val_fraction > 0 and len(val_idx) == 0:
        raise DataError(f"--val-fraction {val_fraction} leaves no validation images from {len(train_all)} "
                        "training images; raise it or use more data")
    train = train_all.subset(train_idx)
    if max_train_samples is not None and max_train_samples < len(train):
        keep, _ = stratified_split(train.fine, 1 - max_train_samples / len(train), seed)
        train = train.subset(keep)
    bundle = DatasetBundle(train, train_all.subset(val_idx), test, raw.fine_names, raw.coarse_names,
                           raw.fine_to_coarse, raw.fingerprint, raw.source, _source_kind(dataset),
                           {"train": len(train_all), "test": len(test)})
    bundle.drop_partial_coarse()
    return bundle


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices so each class keeps its share: returns (keep, held_out) with round(N * fraction) held
    out, allotted to classes by largest remainder (as sklearn's StratifiedShuffleSplit), so tiny classes
    still add up to the right total."""
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * fraction
    n_held = exact.floor().long()
    short = round(len(labels) * fraction) - int(n_held.sum())
    if short > 0:  # ties among equal remainders are broken at random, reproducibly
        order = torch.argsort(exact - n_held + torch.rand(len(classes), generator=gen, dtype=torch.float64) * 1e-9,
                              descending=True)
        n_held[order[:short]] += 1
    keep, held = [], []
    for cls, n in zip(classes.tolist(), n_held.tolist()):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held.append(idx[:n])
        keep.append(idx[n:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


def load_raw(
    dataset: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    coarse_label_column: str | None = None,
    splits: tuple[str, ...] = ("train", "test"),
    cache: bool = True,
    skip_unreadable: bool = False,
) -> RawDataset:
    """Decode the requested splits of a source, from the on-disk tensor store when it is fresh.
    Unreadable images are an error, or with `skip_unreadable` dropped and listed in `RawDataset.unreadable`."""
    key = _source_key(dataset, image_column, label_column, coarse_label_column, splits)
    store = cache_dir() / "stores" / f"{key}.safetensors"
    cache = cache and not skip_unreadable
    if cache and store.is_file():
        try:
            return _read_store(store, dataset)
        except Exception as err:  # a corrupt cache is rebuilt, never fatal
            log.warning("ignoring unreadable data cache %s (%s)", store, err)
    raw = _load_source(dataset, image_column, label_column, coarse_label_column, splits, skip_unreadable)
    if cache:
        _write_store(raw, store)
    return raw


def cache_dir() -> Path:
    return Path(os.environ.get("CIFAR_TL_CACHE", Path.home() / ".cache" / "cifar_tl"))


def decode_image(data: bytes | Image.Image | np.ndarray) -> np.ndarray:
    """Any image (bytes, PIL, array) -> uint8 RGB array [H, W, 3]; grayscale, palette, RGBA, CMYK, 16-bit
    and EXIF-rotated inputs are all normalised here so every caller sees the same pixels."""
    from PIL import ImageOps

    if isinstance(data, np.ndarray):
        img = Image.fromarray(data)
    elif isinstance(data, Image.Image):
        img = data
    else:
        img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits, do not clip
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def coarse_probs(fine_probs: torch.Tensor, fine_to_coarse, num_coarse: int) -> torch.Tensor:
    """Superclass probabilities = fine probabilities summed per superclass (consistent by construction)."""
    index = torch.as_tensor(fine_to_coarse, device=fine_probs.device)
    out = torch.zeros(fine_probs.shape[0], num_coarse, device=fine_probs.device, dtype=fine_probs.dtype)
    return out.index_add_(1, index, fine_probs)


# --------------------------------------------------------------------------------------------- sources


def _source_kind(dataset: str) -> str:
    path = Path(dataset)
    if path.is_file():
        if dataset.endswith((".tar.gz", ".tgz", ".tar")):
            return "cifar-tar"
        raise DataError(f"--dataset {dataset}: a file, but not a cifar-100-python .tar.gz archive")
    if path.is_dir():
        if _cifar_pickle_dir(path) is not None:
            return "cifar-pickle"
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "save-to-disk"
        if any(path.rglob("*.parquet")):
            return "parquet"
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
            return "imagefolder"
        raise DataError(f"--dataset {dataset}: folder holds no parquet files, no save_to_disk dataset, no "
                        "cifar-100-python files (train, test, meta) and no images")
    if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise DataError(f"--dataset {dataset}: no such file or folder")
    return "hub"


def _cifar_pickle_dir(path: Path) -> Path | None:
    for candidate in (path, path / "cifar-100-python"):
        if all((candidate / name).is_file() for name in ("train", "test", "meta")):
            return candidate
    return None


def _load_source(dataset, image_column, label_column, coarse_label_column, splits, skip_unreadable) -> RawDataset:
    kind = _source_kind(dataset)
    if kind in ("cifar-tar", "cifar-pickle"):
        return _load_cifar_pickle(dataset, kind, splits)
    return _load_hf(dataset, kind, image_column, label_column, coarse_label_column, splits, skip_unreadable)


class _SafeUnpickler(pickle.Unpickler):
    """The official CIFAR pickles hold only dicts, lists and numpy arrays: refuse anything else, so a
    tampered file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as err:
        raise DataError(f"{where}: not a readable CIFAR pickle ({err})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _load_cifar_pickle(dataset: str, kind: str, splits) -> RawDataset:
    files: dict[str, bytes] = {}
    if kind == "cifar-tar":
        try:
            with tarfile.open(dataset) as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if member.isfile() and name in ("train", "test", "meta"):
                        files[name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"--dataset {dataset}: unreadable archive ({err})") from None
    else:
        folder = _cifar_pickle_dir(Path(dataset))
        files = {name: (folder / name).read_bytes() for name in ("train", "test", "meta")}
    for name in ("train", "test", "meta"):
        if name not in files:
            raise DataError(f"--dataset {dataset}: the archive has no '{name}' file (expected cifar-100-python/"
                            "{train,test,meta})")
    meta = _unpickle(files["meta"], f"{dataset}: meta")
    fine_names = [str(n) for n in meta.get("fine_label_names", [])]
    coarse_names = [str(n) for n in meta.get("coarse_label_names", [])] or None
    if not fine_names:
        raise DataError(f"{dataset}: meta has no 'fine_label_names'")
    out = {}
    for split in splits:
        if split not in ("train", "test"):
            raise DataError(f"--train-split/--test-split {split!r}: cifar-100-python has only train and test")
        d = _unpickle(files[split], f"{dataset}: {split}")
        for col in ("data", "fine_labels"):
            if col not in d:
                raise DataError(f"{dataset}: {split} has no '{col}' entry")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{dataset}: {split} 'data' must be N x 3072 uint8, got shape {data.shape}")
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        fine = _check_labels(np.asarray(d["fine_labels"]), len(fine_names), f"{dataset}: {split} fine_labels")
        coarse = None
        if coarse_names and "coarse_labels" in d:
            coarse = _check_labels(np.asarray(d["coarse_labels"]), len(coarse_names),
                                   f"{dataset}: {split} coarse_labels")
        out[split] = Split(images, fine, coarse)
    return _finish(out, fine_names, coarse_names, dataset)


def _load_hf(dataset, kind, image_column, label_column, coarse_label_column, splits, skip_unreadable) -> RawDataset:
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        if kind == "save-to-disk":
            ds = datasets.load_from_disk(dataset)
        elif kind == "imagefolder":
            ds = datasets.load_dataset("imagefolder", data_dir=dataset)
        else:
            ds = datasets.load_dataset(dataset)
    except Exception as err:  # datasets raises many types; keep the reason, drop the deep traceback
        if kind == "hub":
            from huggingface_hub import is_offline_mode

            why = "offline mode is on (HF_HUB_OFFLINE=1)" if is_offline_mode() else "the Hub could not be reached"
            raise DataError(
                f"--dataset {dataset}: not a local path and {why}, and it is not in the local datasets cache "
                f"({type(err).__name__}: {err}). Download it where the Hub is reachable, or pass a local copy: "
                "--dataset PATH to parquet files, a save_to_disk folder, cifar-100-python(.tar.gz) or an image "
                "folder.") from None
        raise DataError(f"--dataset {dataset}: could not be read as {kind} ({type(err).__name__}: {err})") from None
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    out, unreadable = {}, {}
    names: dict[str, list[str] | None] = {}
    for split in splits:
        if split not in ds:
            flag = "--test-split" if split == splits[-1] else "--train-split"
            raise DataError(f"--dataset {dataset}: has no split {split!r} (it has {', '.join(ds)}); "
                            f"choose another with {flag}")
        part = ds[split]
        if len(part) == 0:
            raise DataError(f"--dataset {dataset}: split {split!r} is empty")
        img_col = _pick_column(part, image_column, IMAGE_COLUMNS, "--image-column", dataset, split)
        fine_col = _pick_column(part, label_column, LABEL_COLUMNS, "--label-column", dataset, split)
        coarse_col = (_pick_column(part, coarse_label_column, (), "--coarse-label-column", dataset, split)
                      if coarse_label_column else next((c for c in COARSE_COLUMNS if c in part.column_names), None))
        fine_names, fine = _labels(part, fine_col, names.get("fine"), f"{dataset}: {split} column {fine_col!r}")
        names["fine"] = fine_names
        coarse = None
        if coarse_col:
            names["coarse"], coarse = _labels(part, coarse_col, names.get("coarse"),
                                              f"{dataset}: {split} column {coarse_col!r}")
        images, bad = _decode_column(part, img_col, f"{dataset}: {split} column {img_col!r}", skip_unreadable)
        split_data = Split(images, fine, coarse)
        if bad:
            keep = torch.ones(len(fine), dtype=torch.bool)
            keep[bad] = False
            split_data = Split(images, fine[keep], None if coarse is None else coarse[keep])
            unreadable[split] = bad
        out[split] = split_data
    raw = _finish(out, names["fine"], names.get("coarse"), dataset)
    raw.unreadable = unreadable
    return raw


def _pick_column(part, chosen, candidates, flag, dataset, split) -> str:
    cols = part.column_names
    if chosen:
        if chosen not in cols:
            raise DataError(f"--dataset {dataset}: split {split!r} has no column {chosen!r} given by {flag} "
                            f"(columns: {', '.join(cols)})")
        return chosen
    for c in candidates:
        if c in cols:
            return c
    raise DataError(f"--dataset {dataset}: split {split!r} has none of the columns {', '.join(candidates)} "
                    f"(columns: {', '.join(cols)}); name the right one with {flag}")


def _labels(part, column: str, known_names, where: str) -> tuple[list[str], torch.Tensor]:
    import datasets

    feature = part.features[column]
    values = list(part[column])
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif values and isinstance(values[0], str):  # string labels: classes are the sorted distinct names
        names = known_names or sorted(set(values))
        lookup = {n: i for i, n in enumerate(names)}
        missing = sorted(set(values) - set(lookup))
        if missing:
            raise DataError(f"{where}: labels {missing[:5]} do not appear in the train split")
        values = [lookup[v] for v in values]
    else:
        names = known_names or [str(i) for i in range(int(max(values)) + 1)]
    return names, _check_labels(np.asarray(values), len(names), where)


def _check_labels(values: np.ndarray, num_classes: int, where: str) -> torch.Tensor:
    if values.size == 0:
        raise DataError(f"{where}: no labels")
    if not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {values.dtype}")
    bad = np.nonzero((values < 0) | (values >= num_classes))[0]
    if len(bad):
        raise DataError(f"{where}: {len(bad)} label(s) outside 0..{num_classes - 1} "
                        f"(rows {bad[:10].tolist()}, values {values[bad[:10]].tolist()})")
    return torch.from_numpy(values.astype(np.int64))


def _decode_column(part, column: str, where: str, skip_unreadable: bool = False) -> tuple[torch.Tensor, list[int]]:
    import datasets

    if isinstance(part.features[column], datasets.Image):
        part = part.cast_column(column, datasets.Image(decode=False))
    arrays, bad = [], []
    row = 0
    for batch in part.select_columns([column]).iter(batch_size=2048):
        for item in batch[column]:
            try:
                if isinstance(item, dict):
                    item = item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes()
                arrays.append(decode_image(item))
            except (UnidentifiedImageError, OSError, ValueError, TypeError, KeyError):
                bad.append(row)
            row += 1
    if bad and not skip_unreadable:
        raise DataError(f"{where}: {len(bad)} unreadable image(s) at rows {bad[:20]}"
                        f"{' ...' if len(bad) > 20 else ''}; fix or remove them")
    if not arrays:
        raise DataError(f"{where}: no readable images")
    return _stack(arrays, where), bad


def _stack(arrays: list[np.ndarray], where: str) -> torch.Tensor:
    sizes = Counter(a.shape[:2] for a in arrays)
    (h, w), _ = sizes.most_common(1)[0]
    if len(sizes) > 1:  # mixed sizes (image folders): bring all to the most common one
        log.warning("%s: %d image sizes found; resizing all to %dx%d", where, len(sizes), w, h)
        arrays = [a if a.shape[:2] == (h, w) else
                  np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC)) for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _finish(splits: dict[str, Split], fine_names, coarse_names, source: str) -> RawDataset:
    fine_to_coarse = None
    if coarse_names is not None and all(s.coarse is not None for s in splits.values()):
        fine_to_coarse = derive_fine_to_coarse(splits, fine_names, coarse_names, source)
    else:
        coarse_names = None
        for s in splits.values():
            s.coarse = None
    sizes = {tuple(s.images.shape[1:]) for s in splits.values()}
    if len(sizes) > 1:
        raise DataError(f"{source}: splits have different image sizes {sorted(sizes)}")
    h = hashlib.sha1()
    for name in sorted(splits):
        s = splits[name]
        h.update(name.encode())
        h.update(s.images.numpy().tobytes())
        h.update(s.fine.numpy().tobytes())
    h.update(json.dumps([fine_names, coarse_names]).encode())
    return RawDataset(splits, list(fine_names), coarse_names and list(coarse_names), fine_to_coarse,
                      h.hexdigest()[:16], source)


def derive_fine_to_coarse(splits: dict[str, Split], fine_names, coarse_names, source: str) -> list[int]:
    """Each fine class must belong to exactly one superclass in every row of every split."""
    fine = torch.cat([s.fine for s in splits.values()])
    coarse = torch.cat([s.coarse for s in splits.values()])
    pairs = torch.unique(fine * len(coarse_names) + coarse)
    mapping: dict[int, set[int]] = {}
    for p in pairs.tolist():
        mapping.setdefault(p // len(coarse_names), set()).add(p % len(coarse_names))
    for f, cs in mapping.items():
        if len(cs) > 1:
            raise DataError(f"{source}: fine class {fine_names[f]!r} appears under several superclasses "
                            f"({', '.join(coarse_names[c] for c in sorted(cs))}); the coarse labels are inconsistent")
    missing = [fine_names[f] for f in range(len(fine_names)) if f not in mapping]
    if missing:  # e.g. a 20-image test set: the map is partial (-1); training then drops coarse labels
        log.warning("%s: %d fine classes never appear (%s...), so their superclass is unknown", source,
                    len(missing), ", ".join(missing[:3]))
    return [next(iter(mapping[f])) if f in mapping else -1 for f in range(len(fine_names))]


# --------------------------------------------------------------------------------------------- cache


def _source_key(dataset, *parts) -> str:
    """Identify a source cheaply (paths, sizes, mtimes) so a warm run skips decoding entirely."""
    h = hashlib.sha1(json.dumps([STORE_VERSION, os.path.abspath(dataset) if os.path.exists(dataset) else dataset,
                                 parts], default=str).encode())
    path = Path(dataset)
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _write_store(raw: RawDataset, path: Path) -> None:
    tensors, meta = {}, {"fine_names": raw.fine_names, "coarse_names": raw.coarse_names,
                          "fine_to_coarse": raw.fine_to_coarse, "fingerprint": raw.fingerprint,
                          "splits": sorted(raw.splits)}
    for name, s in raw.splits.items():
        tensors[f"{name}.images"] = s.images.contiguous()
        tensors[f"{name}.fine"] = s.fine
        if s.coarse is not None:
            tensors[f"{name}.coarse"] = s.coarse
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"cifar_tl": json.dumps(meta)})


def _read_store(path: Path, source: str) -> RawDataset:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["cifar_tl"])
    tensors = load_file(str(path))
    splits = {n: Split(tensors[f"{n}.images"], tensors[f"{n}.fine"], tensors.get(f"{n}.coarse"))
              for n in meta["splits"]}
    return RawDataset(splits, meta["fine_names"], meta["coarse_names"], meta["fine_to_coarse"],
                      meta["fingerprint"], source)


# --------------------------------------------------------------------------------------------- batches


class TensorDataset(torch.utils.data.Dataset):
    """Batches are gathered with one tensor index (`__getitems__`), not N per-sample calls."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        if self.split.images.is_cuda:  # a pinned, asynchronous copy: a pageable one would stall the host
            idx = idx.pin_memory().to(self.split.images.device, non_blocking=True)
        # index_select is ~20x faster than advanced indexing for a batch gather (bench/train_throughput.py)
        batch = {"image": self.split.images.index_select(0, idx), "fine": self.split.fine.index_select(0, idx)}
        if self.split.coarse is not None:
            batch["coarse"] = self.split.coarse.index_select(0, idx)
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _identity(batch):
    return batch


def on_device(split: Split, device: torch.device, share: float = 0.25) -> Split:
    """`split` moved into GPU memory when it takes at most `share` of the free memory: batches are then
    gathered on the GPU and the host never copies or waits for an image batch. CPU or too big: unchanged."""
    if device.type != "cuda" or split.images.is_cuda:
        return split
    free, _ = torch.cuda.mem_get_info(device)
    if split.nbytes > share * free:
        log.info("data stays in host memory: %.1f GB is more than %.0f%% of the GPU's free %.1f GB",
                 split.nbytes / 1e9, 100 * share, free / 1e9)
        return split
    return split.to(device)


def make_loader(split: Split, batch_size: int, *, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(TensorDataset(split), batch_size=batch_size, shuffle=shuffle,
                                       drop_last=drop_last, collate_fn=_identity, generator=gen)
