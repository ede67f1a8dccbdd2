"""Data layer: a source (`sources.read_source`) -> a decoded uint8 tensor store, cached on disk as safetensors
-> stratified train/val/test splits (`DatasetBundle`) -> batches gathered with one tensor index.

Images are decoded once into uint8 tensors [N, 3, S, S], so later runs start in about a second and the training
loop never touches PIL.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import WriteError, atomic_path
from .integrity import seal, seal_problem
from .sources import (
    DataError,
    MissingSplitError,
    RawDataset,
    Sizing,
    Split,
    read_source,
    source_kind,
    walk_files,
)

log = logging.getLogger(__name__)

STORE_VERSION = "3"  # bumped when decoding changes what a store holds (3: 16-bit grey scaled by its depth)


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
    test_held_out: float | None = None  # the source had no test split: this share of its train split is the test

    @property
    def num_classes(self) -> int:
        return len(self.fine_names)

    def describe(self) -> dict:
        """The data a run used, as the model card states it: the source and how it was read, the images in
        each split the run used (train after --max-train-samples) and in the source's own splits."""
        return {"source": self.source, "kind": self.kind, "fingerprint": self.fingerprint,
                "train": len(self.train), "val": len(self.val), "test": len(self.test),
                "source_sizes": dict(self.source_sizes), "test_held_out": self.test_held_out,
                "num_classes": self.num_classes,
                "num_coarse": len(self.coarse_names) if self.coarse_names else 0}

    @property
    def has_coarse(self) -> bool:
        return self.coarse_names is not None

    def drop_partial_coarse(self) -> None:
        """Superclass metrics need every fine class mapped; a partial map (unseen classes) disables them."""
        if self.fine_to_coarse is not None and -1 in self.fine_to_coarse:
            log.warning("%s: superclass labels disabled (the fine->coarse map is incomplete: %d of the %d fine "
                        "classes never appear)", self.source, self.fine_to_coarse.count(-1), len(self.fine_to_coarse))
            self.coarse_names = self.fine_to_coarse = None
            for split in (self.train, self.val, self.test):
                split.coarse = None

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


# --------------------------------------------------------------------------------------------- public API


TEST_SEED = 0  # a held-out test share depends on the data alone, not on a run's --seed: runs stay comparable


def load_bundle(
    dataset: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    coarse_label_column: str | None = None,
    train_split: str | None = "train",
    test_split: str = "test",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train_samples: int | None = None,
    seed: int = 42,
    cache: bool = True,
    sizing: Sizing | None = None,
    partial_coarse: bool = False,
) -> DatasetBundle:
    """Load a source and split its train split into stratified train/val; test stays untouched.
    A source with a train split alone (a folder of class folders) gets a test split: a stratified `test_fraction`
    of its train split, drawn with a fixed seed; a source with other splits must name its test split.
    `train_split=None` reads the test split alone (an evaluation of a test-only source): train and val are empty.
    A fine->coarse map the data leaves partial (classes it never shows) turns superclass labels off, unless
    `partial_coarse` keeps it for the caller to complete (evaluation)."""
    dataset = os.path.expanduser(dataset)  # `--dataset=~/x` and YAML reach here unexpanded by the shell
    load = partial(load_raw, dataset, image_column=image_column, label_column=label_column,
                   coarse_label_column=coarse_label_column, cache=cache, sizing=sizing)
    held_out = None
    if train_split is None:
        raw = load(splits=(test_split,))
        test = raw.splits[test_split]
        train_all = train = val = test.subset(slice(0, 0))
    else:
        try:
            raw = load(splits=(train_split, test_split))
            train_all, test = raw.splits[train_split], raw.splits[test_split]
        except MissingSplitError as err:
            others = [name for name in err.have if name != train_split]
            if err.split != test_split or train_split not in err.have or others:
                raise  # a source with other splits names its test split (a typo must not test on training images)
            if test_fraction <= 0:
                raise DataError(f"{err}, or hold out a share of its {train_split!r} split with --test-fraction"
                                ) from None
            raw = load(splits=(train_split,))
            keep, test_idx = stratified_split(raw.splits[train_split].fine, test_fraction, TEST_SEED)
            train_all, test = raw.splits[train_split].subset(keep), raw.splits[train_split].subset(test_idx)
            held_out = test_fraction
            log.info("%s has no %r split: a stratified %g %% of its %r split (%d images) is held out as the test "
                     "split (--test-fraction)", dataset, test_split, 100 * test_fraction, train_split, len(test))
        train_idx, val_idx = stratified_split(train_all.fine, val_fraction, seed)
        if val_fraction > 0 and len(val_idx) == 0:
            raise DataError(f"--val-fraction {val_fraction} leaves no validation images from {len(train_all)} "
                            "training images; raise it or use more data")
        train, val = train_all.subset(train_idx), train_all.subset(val_idx)
        if max_train_samples is not None and max_train_samples < len(train):
            keep, _ = stratified_split(train.fine, 1 - max_train_samples / len(train), seed)
            train = train.subset(keep)
            missing = len(raw.fine_names) - len(torch.unique(train.fine))
            if missing:  # a smoke test may mean it; a real run would report classes it could never predict
                log.warning("--max-train-samples %d leaves %d of the %d classes without a training image (the "
                            "model cannot learn them); use at least %d", max_train_samples, missing,
                            len(raw.fine_names), len(raw.fine_names))
    sizes = {"train": len(train_all) + len(test)} if held_out else {"train": len(train_all), "test": len(test)}
    bundle = DatasetBundle(train, val, test, raw.fine_names, raw.coarse_names, raw.fine_to_coarse,
                           raw.fingerprint, raw.source, source_kind(dataset), sizes, held_out)
    if not partial_coarse:
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
    sizing: Sizing | None = None,
) -> RawDataset:
    """Decode the requested splits of a source, from the on-disk tensor store when it is fresh.
    Unreadable images are an error, or with `skip_unreadable` dropped and listed in `RawDataset.unreadable`.
    `sizing` sets the store size (`sources.Sizing`)."""
    sizing, dataset = sizing or Sizing(), os.path.expanduser(dataset)
    key = _source_key(dataset, image_column, label_column, coarse_label_column, splits, sizing.forced)
    store = cache_dir() / "stores" / f"{key}.safetensors"
    cache = cache and not skip_unreadable
    damage = seal_problem(store) if cache else None
    if damage:  # a damaged cache is decoded again, never used: a flipped byte is still a loadable file
        log.warning("ignoring damaged data cache %s (%s); decoding the source again", store, damage)
    elif cache and store.is_file():
        try:
            raw = _read_store(store, dataset)
            # mixed sizes were fitted to what an earlier model needed: another size needs another decode
            if not raw.fitted or sizing.forced or raw.splits[splits[0]].images.shape[-1] == sizing.mixed:
                return raw
        except Exception as err:  # an unreadable cache is rebuilt, never fatal
            log.warning("ignoring unreadable data cache %s (%s)", store, err)
    raw = read_source(dataset, image_column=image_column, label_column=label_column,
                      coarse_label_column=coarse_label_column, splits=splits, skip_unreadable=skip_unreadable,
                      sizing=sizing)
    if cache:
        try:
            _write_store(raw, store)
        except WriteError as err:  # a cache, not an output: a full or read-only cache disk costs speed, not the run
            log.warning("%s; the decoded images stay in memory, uncached (CIFAR_TL_CACHE moves the cache)", err)
    return raw


def cache_dir() -> Path:
    return Path(os.environ.get("CIFAR_TL_CACHE", Path.home() / ".cache" / "cifar_tl"))


def coarse_probs(fine_probs: torch.Tensor, fine_to_coarse, num_coarse: int) -> torch.Tensor:
    """Superclass probabilities = fine probabilities summed per superclass (consistent by construction)."""
    index = torch.as_tensor(fine_to_coarse, device=fine_probs.device)
    out = torch.zeros(fine_probs.shape[0], num_coarse, device=fine_probs.device, dtype=fine_probs.dtype)
    return out.index_add_(1, index, fine_probs)


# --------------------------------------------------------------------------------------------- cache


def _source_key(dataset, *parts) -> str:
    """Identify a source cheaply (paths, sizes, mtimes) so a warm run skips decoding entirely."""
    h = hashlib.sha1(json.dumps([STORE_VERSION, os.path.abspath(dataset) if os.path.exists(dataset) else dataset,
                                 parts], default=str).encode())
    path = Path(dataset)
    if path.exists():
        for f in [path] if path.is_file() else walk_files(path):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _write_store(raw: RawDataset, path: Path) -> None:
    tensors, meta = {}, {"fine_names": raw.fine_names, "coarse_names": raw.coarse_names,
                          "fine_to_coarse": raw.fine_to_coarse, "fingerprint": raw.fingerprint,
                          "splits": sorted(raw.splits), "fitted": raw.fitted}
    for name, s in raw.splits.items():
        tensors[f"{name}.images"] = s.images.contiguous()
        tensors[f"{name}.fine"] = s.fine
        if s.coarse is not None:
            tensors[f"{name}.coarse"] = s.coarse
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"cifar_tl": json.dumps(meta)})
    seal(path)


def _read_store(path: Path, source: str) -> RawDataset:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["cifar_tl"])
    tensors = load_file(str(path))
    splits = {n: Split(tensors[f"{n}.images"], tensors[f"{n}.fine"], tensors.get(f"{n}.coarse"))
              for n in meta["splits"]}
    return RawDataset(splits, meta["fine_names"], meta["coarse_names"], meta["fine_to_coarse"],
                      meta["fingerprint"], source, fitted=meta["fitted"])


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
