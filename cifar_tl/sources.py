"""Dataset sources -> decoded uint8 splits (`RawDataset`). Detected from `--dataset`:

  * a Hub id (default `uoft-cs/cifar100`), a local folder of Hub-style parquet files, or a `save_to_disk`
    folder, read with `datasets`;
  * the official `cifar-100-python` folder or `.tar.gz` (pickles read by an unpickler that accepts arrays only);
  * an image folder, `class_name/xxx.png`, optionally under `train/` and `test/`; linked folders are followed.

Every image of every split ends up at one square store size: a source whose images all share one square size
keeps it (CIFAR: 32 px); otherwise (photos of mixed sizes, or `--store-size`) each image is resized on its short
side and centre-cropped, as timm's and torchvision's eval transforms do, so no aspect ratio is distorted.
`fit_square` is the same operation the Predictor applies to a photo at inference."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("fine_label", "label")
COARSE_COLUMNS = ("coarse_label",)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_FOLDERS = {"train", "test", "validation", "valid", "val", "dev"}
MAX_STORE_SIZE = 256  # the default store size of mixed-size images is capped: 256 px x 3 channels = 192 KiB an image
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, TypeError, KeyError, Image.DecompressionBombError)


class DataError(ValueError):
    """The dataset cannot be used as given; the message names the source, split, column or flag."""


class MissingSplitError(DataError):
    """A split asked for is not in the source; `have` names the splits it has (a CLI may choose among them)."""

    def __init__(self, dataset: str, split: str, flag: str, have: Iterable[str]):
        self.split, self.have = split, sorted(have)
        super().__init__(f"--dataset {dataset}: has no split {split!r} (it has {', '.join(self.have) or 'none'}); "
                         f"choose another with {flag}")


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
    unreadable: dict[str, list] = field(default_factory=dict)  # split -> skipped rows/files (skip mode only)
    fitted: bool = False  # images were resized to the store size (mixed sizes or --store-size)


@dataclass
class Sizing:
    """The store size: `forced` (--store-size) for every image; else the images' own size when they all share
    one square size; else `mixed` (what the model needs, capped at MAX_STORE_SIZE)."""

    forced: int | None = None
    mixed: int = 32

    def decide(self, sizes: Counter, source: str) -> int | None:
        if self.forced:
            return self.forced
        if len(sizes) <= 1 and all(w == h for w, h in sizes):  # one square size (or nothing readable)
            return None
        shown = ", ".join(f"{w}x{h}" for (w, h), _ in sizes.most_common(3))
        log.warning("%s: %d image sizes (%s%s); every image is resized on its short side to %d px and centre-"
                    "cropped (--store-size chooses)", source, len(sizes), shown, ", ..." if len(sizes) > 3 else "",
                    self.mixed)
        return self.mixed


def read_source(dataset: str, *, image_column=None, label_column=None, coarse_label_column=None,
                splits: tuple[str, ...] = ("train", "test"), skip_unreadable: bool = False,
                sizing: Sizing | None = None) -> RawDataset:
    kind = source_kind(dataset)
    sizing = sizing or Sizing()
    if kind in ("cifar-tar", "cifar-pickle"):
        return _load_cifar_pickle(dataset, kind, splits, sizing,
                                  coarse_only=_pickle_level(dataset, image_column, label_column, coarse_label_column))
    if kind == "imagefolder":
        given = [flag for flag, value in (("--image-column", image_column), ("--label-column", label_column),
                                          ("--coarse-label-column", coarse_label_column)) if value]
        if given:  # silently ignored, they trained something else than asked
            raise DataError(f"--dataset {dataset}: an image folder has no columns (its classes are its sub-folders);"
                            f" leave out {', '.join(given)}")
        return _load_image_folder(dataset, splits, skip_unreadable, sizing)
    return _load_hf(dataset, kind, image_column, label_column, coarse_label_column, splits, skip_unreadable, sizing)


# --------------------------------------------------------------------------------------------- images


def decode_image(data: bytes | Image.Image | np.ndarray, shrink_to: int | None = None) -> np.ndarray:
    """Any image (bytes, PIL, array) -> uint8 RGB array [H, W, 3]; grayscale, palette, RGBA, CMYK, 16-bit
    and EXIF-rotated inputs are all normalised here so every caller sees the same pixels. With `shrink_to`, an
    image whose short side is over 16x that is first reduced by whole-pixel box averaging to 8-16x it, so the
    conversions below copy a small image, not a camera's 89 megapixels several times over."""
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data)
    elif isinstance(data, Image.Image):
        img = data
    else:
        img = Image.open(io.BytesIO(data))
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even an upright image
        img = ImageOps.exif_transpose(img)
    if shrink_to and min(img.size) >= 16 * shrink_to:  # 8x the target keeps the final resize's result
        img = _reduced(img, min(img.size) // (8 * shrink_to))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (PNG's, as Pillow opens it) to 8 bits by
        # its depth, as an 8-bit copy of the same picture would be: a dark image stays dark, not stretched
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _reduced(img: Image.Image, factor: int) -> Image.Image:
    """`img` box-averaged over factor x factor blocks; modes Pillow cannot reduce are widened first."""
    if img.mode.startswith("I;16"):
        img = img.convert("I")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.reduce(factor)


def fit_square(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> [size, size, 3]: resized on its short side (bicubic) and centre-cropped."""
    if arr.shape[:2] == (size, size):
        return arr
    return np.asarray(ImageOps.fit(Image.fromarray(arr), (size, size), Image.BICUBIC))


def _open(cell) -> Image.Image | np.ndarray:
    """A stored image cell (bytes, a {"bytes", "path"} dict, a path, a PIL image or an array), opened lazily."""
    if isinstance(cell, dict):
        cell = cell["bytes"] if cell.get("bytes") is not None else cell.get("path")
    if cell is None:  # an empty cell (a null in the parquet)
        raise ValueError("no image in this cell")
    if isinstance(cell, (bytes, bytearray)):
        return Image.open(io.BytesIO(cell))
    if isinstance(cell, (str, Path)):
        return Image.open(cell)
    return cell


def _size(cell) -> tuple[int, int] | None:
    """(width, height) as the image will be decoded (EXIF rotation applied), from its header; None when unreadable."""
    try:
        img = _open(cell)
    except UNREADABLE:
        return None
    if isinstance(img, np.ndarray):
        return img.shape[1], img.shape[0]
    width, height = img.size
    return (height, width) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (width, height)


def _decode(cell, size: int | None) -> np.ndarray:
    img = _open(cell)
    if size and isinstance(img, Image.Image):
        img.draft("RGB", (size, size))  # JPEG decodes at a reduced scale that still covers the store size
    arr = decode_image(img)
    return fit_square(arr, size) if size else arr


def _decode_splits(cells: dict[str, list], where: dict[str, str], sizing: Sizing, skip_unreadable: bool,
                   source: str) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], bool]:
    """Decode every split's cells to one store size: uint8 [N, 3, S, S] per split, the unreadable rows per split,
    and whether images were resized."""
    size = sizing.forced or sizing.decide(Counter(s for c in cells.values() for s in map(_size, c) if s), source)
    images, unreadable = {}, {}
    for split, items in cells.items():
        arrays, bad, first = [], [], None
        for row, cell in enumerate(items):
            try:
                arrays.append(_decode(cell, size))
            except UNREADABLE as err:
                bad.append(row)
                first = first or f"{type(err).__name__}: {err}"
        if bad and not skip_unreadable:
            raise DataError(f"{where[split]}: {len(bad)} unreadable image(s) at {_rows(items, bad)} (the first: "
                            f"{first}); fix or remove them")
        if not arrays:
            raise DataError(f"{where[split]}: no readable images")
        images[split] = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        unreadable[split] = bad
    return images, unreadable, size is not None


def _rows(items: list, bad: list[int]) -> str:
    shown = [str(items[i]) if isinstance(items[i], Path) else i for i in bad[:20]]
    return f"{'files' if isinstance(items[0], Path) else 'rows'} {shown}{' ...' if len(bad) > 20 else ''}"


# --------------------------------------------------------------------------------------------- detection


def hidden(name: str) -> bool:
    """Dot-files and dot-folders (.DS_Store, macOS's ._x.png twins, .ipynb_checkpoints) are never data."""
    return name.startswith(".")


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under `root` but hidden ones, sorted, following linked folders (datasets on another disk are
    usually linked in), each real folder once."""
    top = os.path.realpath(root)
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        # a folder linked twice, or a link back to the walk's own root or above it (a loop)
        if real in seen or (folder != str(root) and (top == real or top.startswith(real + os.sep))):
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        yield from (Path(folder) / name for name in sorted(files) if not hidden(name))


def source_kind(dataset: str) -> str:
    path = Path(dataset)
    if path.is_file():
        if dataset.endswith((".tar.gz", ".tgz", ".tar")):
            return "cifar-tar"
        raise DataError(f"--dataset {dataset}: a file, but not a cifar-100-python or cifar-10-python .tar.gz "
                        "archive")
    if path.is_dir():
        if _cifar_pickle_dir(path) is not None:
            return "cifar-pickle"
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "save-to-disk"
        suffixes = {p.suffix.lower() for p in walk_files(path)}
        if ".parquet" in suffixes:
            return "parquet"
        if suffixes & IMAGE_SUFFIXES:
            return "imagefolder"
        raise DataError(f"--dataset {dataset}: folder holds no parquet files, no save_to_disk dataset, no "
                        "cifar-100-python or cifar-10-batches-py files and no images")
    if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise DataError(f"--dataset {dataset}: no such file or folder")
    return "hub"


# the official python pickles: split -> its files, and the file of class names
CIFAR_PICKLES = {
    "cifar-100-python": {"train": ("train",), "test": ("test",), "meta": "meta"},
    "cifar-10-batches-py": {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",),
                            "meta": "batches.meta"},
}


def _pickle_names(layout: dict) -> tuple[str, ...]:
    return (*layout["train"], *layout["test"], layout["meta"])


def _cifar_pickle_dir(path: Path) -> Path | None:
    for candidate in (path, *(path / folder for folder in CIFAR_PICKLES)):
        if any(all((candidate / name).is_file() for name in _pickle_names(layout))
               for layout in CIFAR_PICKLES.values()):
            return candidate
    return None


def _missing_split(dataset: str, split: str, splits: tuple[str, ...], have: Iterable[str]) -> MissingSplitError:
    return MissingSplitError(dataset, split, "--test-split" if split == splits[-1] else "--train-split", have)


# --------------------------------------------------------------------------------------------- image folders


def _load_image_folder(dataset: str, splits, skip_unreadable: bool, sizing: Sizing) -> RawDataset:
    """`class/x.png`, or `split/class/x.png` when the top-level folders are split names; classes are the sorted
    folder names, files anywhere below a class folder belong to it."""
    root = Path(dataset)
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not hidden(p.name))  # is_dir follows links
    named = [p for p in tops if p.name in SPLIT_FOLDERS]
    # split folders hold class folders; a class that happens to be called "train" (CIFAR-100 has one) holds images
    by_split = named and (len(named) == len(tops) or any(c.is_dir() for p in named for c in p.iterdir()))
    layout = {p.name: p for p in tops} if by_split else {"train": root}
    files = {}
    for split in splits:
        if split not in layout:
            raise _missing_split(dataset, split, splits, layout)
        classes = sorted(p for p in layout[split].iterdir() if p.is_dir() and not hidden(p.name))
        files[split] = [(f, c.name) for c in classes for f in walk_files(c) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files[split]:
            raise DataError(f"--dataset {dataset}: split {split!r} has no images in class folders "
                            f"({layout[split]}/CLASS/*.png)")
    names = sorted({name for _, name in files[splits[0]]})  # the classes are the train split's
    for split in splits[1:]:
        unknown = sorted({name for _, name in files[split]} - set(names))
        if unknown:  # their images could never be predicted right
            raise DataError(f"--dataset {dataset}: class folder(s) {unknown[:5]} of split {split!r} do not appear "
                            f"in split {splits[0]!r}")
    lookup = {name: i for i, name in enumerate(names)}
    cells = {split: [f for f, _ in items] for split, items in files.items()}
    where = {split: f"{dataset}: {split}" for split in splits}
    images, unreadable, fitted = _decode_splits(cells, where, sizing, skip_unreadable, dataset)
    out = {}
    for split, items in files.items():
        bad = set(unreadable[split])
        labels = [lookup[name] for row, (_, name) in enumerate(items) if row not in bad]
        out[split] = Split(images[split], torch.tensor(labels, dtype=torch.int64))
    raw = finish(out, names, None, dataset, fitted)
    raw.unreadable = {s: [str(cells[s][i]) for i in rows] for s, rows in unreadable.items() if rows}
    return raw


# --------------------------------------------------------------------------------------------- CIFAR pickles


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
    # Python 2's str keys and names read as str here; a copy re-pickled by Python 3 from a bytes-mode load keeps
    # bytes (b"data", [b"apple", ...])
    return {_text(k): [_text(n) for n in v] if isinstance(v, list) else v for k, v in obj.items()}


def _text(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


def _pickle_files(dataset: str, kind: str) -> tuple[dict, dict[str, bytes]]:
    """The layout (`CIFAR_PICKLES`) of an official archive or folder, and its files' bytes."""
    wanted = {name for layout in CIFAR_PICKLES.values() for name in _pickle_names(layout)}
    files: dict[str, bytes] = {}
    if kind == "cifar-tar":
        try:
            with tarfile.open(dataset) as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if member.isfile() and name in wanted:
                        files[name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"--dataset {dataset}: unreadable archive ({err})") from None
    else:
        folder = _cifar_pickle_dir(Path(dataset))
        files = {name: (folder / name).read_bytes() for name in wanted if (folder / name).is_file()}
    for layout in CIFAR_PICKLES.values():
        if all(name in files for name in _pickle_names(layout)):
            return layout, files
    raise DataError(f"--dataset {dataset}: the archive holds neither cifar-100-python/{{train,test,meta}} nor "
                    "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}")


def _pickle_level(dataset: str, image_column, label_column, coarse_label_column) -> bool:
    """The column flags a cifar-100-python source understands, in its own names or the Hub layout's: True when
    the run trains on the 20 superclasses (`--label-column coarse_label`). Any other name is refused: ignored,
    it trained the 100 fine classes whatever was asked."""
    def check(flag: str, value, allowed: tuple[str, ...]) -> None:
        if value is not None and value not in allowed:
            raise DataError(f"{flag} {value}: {dataset} (CIFAR python pickles) has the columns "
                            f"{', '.join(allowed)}")
    check("--image-column", image_column, ("img", "data"))
    check("--label-column", label_column, ("label", "labels", "fine_label", "fine_labels", "coarse_label",
                                           "coarse_labels"))
    check("--coarse-label-column", coarse_label_column, ("coarse_label", "coarse_labels"))
    coarse_only = label_column in ("coarse_label", "coarse_labels")
    if coarse_only and coarse_label_column:
        raise DataError(f"--coarse-label-column {coarse_label_column}: it is the label column too; leave it out")
    return coarse_only


def _load_cifar_pickle(dataset: str, kind: str, splits, sizing: Sizing, coarse_only: bool = False) -> RawDataset:
    """The official layouts (CIFAR-100's meta, train, test; CIFAR-10's batches.meta, data_batch_1..5,
    test_batch); `coarse_only`: CIFAR-100's superclasses are the classes."""
    layout, files = _pickle_files(dataset, kind)
    meta = _unpickle(files[layout["meta"]], f"{dataset}: {layout['meta']}")
    fine_key = "fine_label_names" if "fine_label_names" in meta else "label_names"  # CIFAR-100, CIFAR-10
    fine_names = [str(n) for n in meta.get(fine_key, [])]
    coarse_names = [str(n) for n in meta.get("coarse_label_names", [])] or None
    if not fine_names:
        raise DataError(f"{dataset}: {layout['meta']} has neither 'fine_label_names' nor 'label_names'")
    out = {}
    for split in splits:
        if split not in ("train", "test"):
            raise DataError(f"--train-split/--test-split {split!r}: CIFAR python pickles have only train and test")
        parts = [_unpickle(files[name], f"{dataset}: {name}") for name in layout[split]]
        label_key = "fine_labels" if "fine_labels" in parts[0] else "labels"
        for name, part in zip(layout[split], parts):
            for col in ("data", label_key):
                if col not in part:
                    raise DataError(f"{dataset}: {name} has no '{col}' entry")
        data = [np.asarray(part["data"], dtype=np.uint8) for part in parts]
        for name, array in zip(layout[split], data):
            if array.ndim != 2 or array.shape[1] != 3072:
                raise DataError(f"{dataset}: {name} 'data' must be N x 3072 uint8, got shape {array.shape}")
        images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
        if sizing.forced and sizing.forced != 32:
            images = torch.from_numpy(np.stack([fit_square(a, sizing.forced) for a in images.permute(0, 2, 3, 1)
                                                .numpy()])).permute(0, 3, 1, 2).contiguous()
        fine = _check_labels(np.concatenate([np.asarray(part[label_key]) for part in parts]), len(fine_names),
                             f"{dataset}: {split} {label_key}")
        coarse = None
        if coarse_names and all("coarse_labels" in part for part in parts):
            coarse = _check_labels(np.concatenate([np.asarray(part["coarse_labels"]) for part in parts]),
                                   len(coarse_names), f"{dataset}: {split} coarse_labels")
        if coarse_only:
            if coarse is None:
                raise DataError(f"--label-column coarse_label: {dataset} has no coarse labels")
            fine, coarse = coarse, None
        out[split] = Split(images, fine, coarse)
    if coarse_only:
        fine_names, coarse_names = coarse_names, None
    return finish(out, fine_names, coarse_names, dataset, bool(sizing.forced and sizing.forced != 32))


# --------------------------------------------------------------------------------------------- datasets


def _open_hf(dataset: str, kind: str):
    import datasets

    from .offline import hub_offline

    datasets.logging.set_verbosity_error()
    try:
        with hub_offline():  # no network: the local datasets cache at once, not after the Hub client's retries
            ds = datasets.load_from_disk(dataset) if kind == "save-to-disk" else datasets.load_dataset(dataset)
    except Exception as err:  # datasets raises many types; keep the reason, drop the deep traceback
        if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"--dataset {dataset}: the datasets library cannot write its cache ({err.strerror}: "
                            f"{err.filename or datasets.config.HF_DATASETS_CACHE}); point HF_HOME (or "
                            "HF_DATASETS_CACHE) at a writable folder with room") from None
        if kind == "hub":
            from huggingface_hub import is_offline_mode

            why = "offline mode is on (HF_HUB_OFFLINE=1)" if is_offline_mode() else "the Hub could not be reached"
            raise DataError(
                f"--dataset {dataset}: not a local path and {why}, and it is not in the local datasets cache "
                f"({type(err).__name__}: {err}). Download it where the Hub is reachable, or pass a local copy: "
                "--dataset PATH to parquet files, a save_to_disk folder, cifar-100-python(.tar.gz), "
                "cifar-10-batches-py (cifar-10-python.tar.gz) or an image folder.") from None
        raise DataError(f"--dataset {dataset}: could not be read as {kind} ({type(err).__name__}: {err})") from None
    return datasets.DatasetDict({"train": ds}) if isinstance(ds, datasets.Dataset) else ds


def _load_hf(dataset, kind, image_column, label_column, coarse_label_column, splits, skip_unreadable,
             sizing: Sizing) -> RawDataset:
    ds = _open_hf(dataset, kind)
    names: dict[str, list[str] | None] = {}
    labels, cells, where = {}, {}, {}
    for split in splits:
        if split not in ds:
            raise _missing_split(dataset, split, splits, ds)
        part = ds[split]
        if len(part) == 0:
            raise DataError(f"--dataset {dataset}: split {split!r} is empty")
        img_col = _pick_column(part, image_column, IMAGE_COLUMNS, "--image-column", dataset, split)
        fine_col = _pick_column(part, label_column, LABEL_COLUMNS, "--label-column", dataset, split)
        coarse_col = (_pick_column(part, coarse_label_column, (), "--coarse-label-column", dataset, split)
                      if coarse_label_column else next((c for c in COARSE_COLUMNS  # training on it: no superclasses
                                                        if c in part.column_names and c != fine_col), None))
        if coarse_col == fine_col:
            raise DataError(f"--coarse-label-column {coarse_col}: it is the label column too; leave it out")
        _check_kinds(part, dataset, split, (img_col, "--image-column", True), (fine_col, "--label-column", False),
                     *([(coarse_col, "--coarse-label-column", False)] if coarse_col else []))
        names["fine"], fine = _labels(part, fine_col, names.get("fine"), f"{dataset}: {split} column {fine_col!r}")
        coarse = None
        if coarse_col:
            names["coarse"], coarse = _labels(part, coarse_col, names.get("coarse"),
                                              f"{dataset}: {split} column {coarse_col!r}")
        labels[split], cells[split] = (fine, coarse), _cells(part, img_col, None if kind == "hub" else Path(dataset))
        where[split] = f"{dataset}: {split} column {img_col!r}"
    images, unreadable, fitted = _decode_splits(cells, where, sizing, skip_unreadable, dataset)
    out = {}
    for split, (fine, coarse) in labels.items():
        keep = torch.ones(len(fine), dtype=torch.bool)
        keep[unreadable[split]] = False
        out[split] = Split(images[split], fine[keep], None if coarse is None else coarse[keep])
    raw = finish(out, names["fine"], names.get("coarse"), dataset, fitted)
    raw.unreadable = {s: rows for s, rows in unreadable.items() if rows}
    return raw


def _cells(part, column: str, root: Path | None) -> list:
    """The image column's stored cells (encoded bytes where the feature is an Image: decoded later, once); file
    paths relative to a local dataset's folder are resolved there."""
    import datasets

    if isinstance(part.features[column], datasets.Image):
        part = part.cast_column(column, datasets.Image(decode=False))
    cells = [cell for batch in part.select_columns([column]).iter(batch_size=2048) for cell in batch[column]]
    return cells if root is None else [_beside(cell, root) for cell in cells]


def _beside(cell, root: Path):
    """A relative image path as the dataset folder's, when the file is there (else as the working folder's)."""
    path = cell if isinstance(cell, str) else cell.get("path") if isinstance(cell, dict) and not cell.get("bytes") \
        else None
    if not path or os.path.isabs(path) or not (root / path).is_file():
        return cell
    return str(root / path)


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


def _check_kinds(part, dataset: str, split: str, *columns: tuple[str, str, bool]) -> None:
    """Each (column, its flag, holds images?) is not plainly the other kind: class labels (a ClassLabel, numbers)
    as images, or images (an Image feature, bytes, a struct of bytes and path, arrays) as labels."""
    import datasets

    for column, flag, images in columns:
        feature = part.features[column]
        value = feature.dtype if isinstance(feature, datasets.Value) else None
        label_like = isinstance(feature, datasets.ClassLabel) or bool(value) and value.startswith(
            ("int", "uint", "float", "bool"))
        if images and label_like or not images and not (label_like or value and "string" in value):
            kind = value or type(feature).__name__
            raise DataError(f"--dataset {dataset}: split {split!r} column {column!r} holds {kind} values, not "
                            f"{'images' if images else 'class labels'}; name the right column with {flag}")


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


# --------------------------------------------------------------------------------------------- finishing


def finish(splits: dict[str, Split], fine_names, coarse_names, source: str, fitted: bool = False) -> RawDataset:
    """Check the superclass labels and fingerprint the decoded splits."""
    fine_to_coarse = None
    if coarse_names is not None and all(s.coarse is not None for s in splits.values()):
        fine_to_coarse = derive_fine_to_coarse(splits, fine_names, coarse_names, source)
    else:
        coarse_names = None
        for s in splits.values():
            s.coarse = None
    h = hashlib.sha1()
    for name in sorted(splits):
        s = splits[name]
        h.update(name.encode())
        h.update(s.images.numpy().tobytes())
        h.update(s.fine.numpy().tobytes())
    h.update(json.dumps([fine_names, coarse_names]).encode())
    return RawDataset(splits, list(fine_names), coarse_names and list(coarse_names), fine_to_coarse,
                      h.hexdigest()[:16], source, fitted=fitted)


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
        log.info("%s: %d fine classes never appear (%s...), so their superclass is unknown", source,
                    len(missing), ", ".join(missing[:3]))
    return [next(iter(mapping[f])) if f in mapping else -1 for f in range(len(fine_names))]
