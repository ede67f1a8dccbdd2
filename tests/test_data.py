import io
import pickle

import numpy as np
import pytest
import torch
from cifar100_meta import COARSE_NAMES, FINE_NAMES, FINE_TO_COARSE
from PIL import Image

from cifar_tl import data as data_mod
from cifar_tl.augment import TrainTransform, eval_transform, random_crop_flip
from cifar_tl.data import load_bundle, load_raw, make_loader, stratified_split
from cifar_tl.sources import DataError, decode_image


def _same(a, b):
    assert a.fine_names == b.fine_names == FINE_NAMES
    assert a.coarse_names == b.coarse_names == COARSE_NAMES
    assert a.fine_to_coarse == b.fine_to_coarse == FINE_TO_COARSE
    for split in ("train", "test"):
        assert torch.equal(a.splits[split].images, b.splits[split].images)
        assert torch.equal(a.splits[split].fine, b.splits[split].fine)
        assert torch.equal(a.splits[split].coarse, b.splits[split].coarse)
    assert a.fingerprint == b.fingerprint


def test_all_sources_load_to_the_same_tensors(cifar100_parquet, cifar100_pickle, cifar100_tar, cifar100_arrays):
    parquet = load_raw(str(cifar100_parquet), cache=False)
    pickle_dir = load_raw(str(cifar100_pickle), cache=False)
    tar = load_raw(str(cifar100_tar), cache=False)
    _same(parquet, pickle_dir)
    _same(parquet, tar)
    images, fine, coarse = cifar100_arrays["train"]
    train = parquet.splits["train"]
    assert train.images.dtype == torch.uint8 and train.images.shape == (len(fine), 3, 32, 32)
    assert torch.equal(train.images.permute(0, 2, 3, 1), torch.from_numpy(images))
    assert train.fine.tolist() == fine.tolist() and train.coarse.tolist() == coarse.tolist()


def test_a_pickle_copy_with_bytes_keys_loads_as_the_official_one(cifar100_parquet, cifar100_arrays, tmp_path):
    from conftest import write_pickle_dir

    folder = write_pickle_dir(cifar100_arrays, tmp_path, as_bytes=True)  # b"data", [b"apple", ...]
    raw = load_raw(str(folder), cache=False)
    _same(load_raw(str(cifar100_parquet), cache=False), raw)
    assert raw.fine_names == FINE_NAMES and raw.coarse_names == COARSE_NAMES


def test_parent_of_cifar_folder_and_save_to_disk(cifar100_pickle, cifar100_parquet, tmp_path):
    assert load_raw(str(cifar100_pickle.parent), cache=False).fine_names == FINE_NAMES
    import datasets
    ds = datasets.load_dataset(str(cifar100_parquet))
    ds.save_to_disk(str(tmp_path / "saved"))
    _same(load_raw(str(tmp_path / "saved"), cache=False), load_raw(str(cifar100_parquet), cache=False))


def test_image_folder(tmp_path, cifar100_arrays):
    images, fine, _ = cifar100_arrays["train"]
    for split in ("train", "test"):
        for i in range(40):
            folder = tmp_path / split / FINE_NAMES[fine[i] % 3]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i}.png")
    raw = load_raw(str(tmp_path), cache=False)
    assert raw.fine_names == sorted(FINE_NAMES[:3]) and raw.coarse_names is None
    assert raw.splits["train"].images.shape[1:] == (3, 32, 32)


def test_image_folder_with_a_class_called_train(tmp_path, cifar100_arrays):
    """CIFAR-100 has a class "train": as a class folder of images it is a class, not the train split; top-level
    split folders with no class folders below them are still read as splits (and refused)."""
    images, _, _ = cifar100_arrays["train"]
    for i, name in enumerate(["train", "table", "tractor"] * 4):
        (tmp_path / "flat" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / "flat" / name / f"{i}.png")
        (tmp_path / "unlabelled" / ("train" if i % 2 else "test")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / "unlabelled" / ("train" if i % 2 else "test") / f"{i}.png")
    raw = load_raw(str(tmp_path / "flat"), splits=("train",), cache=False)
    assert raw.fine_names == ["table", "tractor", "train"] and len(raw.splits["train"]) == 12
    with pytest.raises(DataError, match="split 'train' has no images in class folders"):
        load_raw(str(tmp_path / "unlabelled"), cache=False)


def test_stratified_split_is_reproducible_and_keeps_shares():
    labels = torch.arange(10).repeat_interleave(torch.arange(10, 110, 10))  # class c has 10*(c+1) items
    keep1, held1 = stratified_split(labels, 0.1, seed=3)
    keep2, held2 = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(held1, held2) and torch.equal(keep1, keep2)
    assert not set(keep1.tolist()) & set(held1.tolist()) and len(keep1) + len(held1) == len(labels)
    counts = torch.bincount(labels[held1], minlength=10)
    assert counts.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert not torch.equal(stratified_split(labels, 0.1, seed=4)[1], held1)


def test_bundle_split_and_subsample(cifar100_parquet):
    b = load_bundle(str(cifar100_parquet), val_fraction=0.25, seed=0)
    assert len(b.train) == 300 and len(b.val) == 100 and len(b.test) == 200
    assert torch.bincount(b.val.fine, minlength=100).tolist() == [1] * 100
    sub = load_bundle(str(cifar100_parquet), val_fraction=0.25, max_train_samples=200, seed=0)
    assert len(sub.train) == 200 and torch.bincount(sub.train.fine, minlength=100).tolist() == [2] * 100
    assert torch.equal(sub.val.fine, b.val.fine)  # the val split does not move when train is subsampled
    assert b.has_coarse and b.num_classes == 100 and b.image_size == 32


def test_a_subsample_smaller_than_the_class_count_warns(cifar100_parquet, caplog):
    with caplog.at_level("WARNING", logger="cifar_tl.data"):
        load_bundle(str(cifar100_parquet), val_fraction=0.25, max_train_samples=100, seed=0)
        assert not caplog.records  # one image per class: every class can be learnt
        load_bundle(str(cifar100_parquet), val_fraction=0.25, max_train_samples=60, seed=0)
    (message,) = caplog.messages
    assert message.startswith("--max-train-samples 60 leaves 40 of the 100 classes without a training image")


def test_second_load_comes_from_the_tensor_store(cifar100_parquet, monkeypatch):
    first = load_raw(str(cifar100_parquet))
    monkeypatch.setattr(data_mod, "read_source", lambda *a, **k: pytest.fail("decoded again"))
    second = load_raw(str(cifar100_parquet))
    _same(first, second)


def test_loader_batches_carry_fine_and_coarse(cifar100_parquet):
    b = load_bundle(str(cifar100_parquet), val_fraction=0.1)
    batch = next(iter(make_loader(b.train, 32, shuffle=True, seed=1)))
    assert batch["image"].shape == (32, 3, 32, 32) and batch["image"].dtype == torch.uint8
    expected = torch.as_tensor(FINE_TO_COARSE)[batch["fine"]]
    assert torch.equal(batch["coarse"], expected)


def test_augmentation_keeps_shapes_and_label_alignment(cifar100_arrays):
    images, fine, _ = cifar100_arrays["test"]
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).contiguous()
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    for size in (32, 64):
        out = TrainTransform(size, mean, std, augment="basic")(x)
        assert out.shape == (64, 3, size, size) and out.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last)
        # each fixture class has its own mean colour: augmentation must not shuffle samples
        colours = out.mean(dim=(2, 3))
        ref = eval_transform(x, size, mean, std).mean(dim=(2, 3))
        nearest = torch.cdist(colours, ref).argmin(dim=1)
        assert (torch.as_tensor(fine[:64])[nearest] == torch.as_tensor(fine[:64])).float().mean() > 0.95
    for size in (32, 64):
        out = TrainTransform(size, mean, std, augment="crop", shift=0.0625)(x)
        assert out.shape == (64, 3, size, size) and out.is_contiguous(memory_format=torch.channels_last)
    ra = TrainTransform(32, mean, std, augment="randaugment")(x)
    assert ra.shape == (64, 3, 32, 32) and torch.isfinite(ra).all()


def test_random_crop_flip_moves_whole_pixels():
    x = torch.arange(400 * 3 * 8 * 8, dtype=torch.float32).view(400, 3, 8, 8)
    out = random_crop_flip(x, 2, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="reflect")
    shifts = set()
    for i in range(len(x)):  # every output is an 8x8 window of the padded image, maybe mirrored
        windows = [(dy, dx, padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5)]
        hits = [(dy, dx) for dy, dx, w in windows if torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1))]
        assert hits, i
        shifts.update(hits)
    assert len(shifts) == 25  # all shifts in [-2, 2]^2 occur
    flipped = random_crop_flip(x, 0, generator=torch.Generator().manual_seed(1)).ne(x).flatten(1).any(1)
    assert torch.equal(random_crop_flip(x, 0, generator=torch.Generator().manual_seed(1))[flipped],
                       x[flipped].flip(-1))
    assert 0.35 < flipped.float().mean() < 0.65


def test_eval_transform_normalises():
    x = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    out = eval_transform(x, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert out.shape == (1, 3, 64, 64) and torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_decode_image_modes(mode):
    img = Image.new("RGB", (5, 7), (200, 100, 50)).convert(mode)
    arr = decode_image(img)
    assert arr.shape == (7, 5, 3) and arr.dtype == np.uint8


def test_16_bit_grey_is_scaled_by_its_depth_not_stretched():
    """A 16-bit PNG of a picture decodes to the pixels of its 8-bit copy: a dark image stays dark."""
    grey = np.array([[0, 10, 100, 255]], np.uint8)
    for array in (grey.astype(np.uint16) * 257, np.full((1, 4), 1000, np.uint16)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        expected = np.rint(array / 257).astype(np.uint8)
        assert np.array_equal(decode_image(buf.getvalue()), np.repeat(expected[..., None], 3, -1))


def test_decode_image_applies_exif_rotation():
    img = Image.new("RGB", (8, 4))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).shape == (8, 4, 3)


# ------------------------------------------------------------------------------------------- bad input


def _parquet(tmp_path, rows, features=None, split="train", extra_test=True):
    import datasets
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / f"{split}-0.parquet"))
    if extra_test and split == "train":
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / "test-0.parquet"))
    return str(tmp_path)


def _png(colour=(1, 2, 3)):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def test_missing_column_names_the_flag(tmp_path):
    import datasets
    feats = datasets.Features({"picture": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    path = _parquet(tmp_path, {"picture": [_png(), _png()], "label": [0, 1]}, feats)
    with pytest.raises(DataError, match="none of the columns img, image.*--image-column"):
        load_raw(path, cache=False)
    assert load_raw(path, image_column="picture", cache=False).fine_names == ["a", "b"]
    with pytest.raises(DataError, match="no column 'lbl' given by --label-column"):
        load_raw(path, image_column="picture", label_column="lbl", cache=False)
    with pytest.raises(DataError, match="column 'label' holds ClassLabel values, not images; name the right "
                                        "column with --image-column"):
        load_raw(path, image_column="label", cache=False)
    with pytest.raises(DataError, match="column 'picture' holds Image values, not class labels; .* --label-column"):
        load_raw(path, image_column="picture", label_column="picture", cache=False)


def test_labels_out_of_range(tmp_path):
    path = _parquet(tmp_path, {"img": [_png(), _png(), _png()], "label": [0, 5, -1]},
                    features=None)
    import datasets  # plain int labels with no names: classes 0..max; negative ones are rejected
    with pytest.raises(DataError, match=r"label\(s\) outside.*rows \[2\]"):
        load_raw(path, cache=False)
    del datasets


def test_unreadable_rows_are_reported_with_indices(tmp_path):
    import datasets
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    rows = {"img": [_png(), {"bytes": b"garbage", "path": None}, _png()], "label": [0, 0, 0]}
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) at rows \[1\]"):
        load_raw(_parquet(tmp_path, rows, feats), cache=False)


def test_missing_split_and_empty_dataset(tmp_path):
    import datasets
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    path = _parquet(tmp_path, {"img": [_png()], "label": [0]}, feats, extra_test=False)
    with pytest.raises(DataError, match="has no split 'test'.*--test-split"):
        load_raw(path, cache=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no parquet"):
        load_raw(str(empty), cache=False)
    with pytest.raises(DataError, match="no such file or folder"):
        load_raw(str(tmp_path / "missing"), cache=False)


def test_hub_id_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="not a local path and offline mode is on.*--dataset PATH"):
        load_raw("someone/not-cached-dataset", cache=False)


def test_inconsistent_superclasses(cifar100_arrays, tmp_path):
    from conftest import write_pickle_dir
    images, fine, coarse = cifar100_arrays["train"]
    bad = coarse.copy()
    bad[np.nonzero(fine == 0)[0][0]] = (FINE_TO_COARSE[0] + 1) % 20
    write_pickle_dir({"train": (images, fine, bad), "test": cifar100_arrays["test"]}, tmp_path)
    with pytest.raises(DataError, match="'apple' appears under several superclasses"):
        load_raw(str(tmp_path), cache=False)


def test_tampered_pickle_is_refused(cifar100_pickle, tmp_path):
    import shutil
    folder = tmp_path / "cifar-100-python"
    shutil.copytree(cifar100_pickle, folder)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_raw(str(folder), cache=False)


def test_val_fraction_too_small(cifar100_parquet):
    with pytest.raises(DataError, match="--val-fraction"):
        load_bundle(str(cifar100_parquet), val_fraction=0.001)


def test_training_on_the_superclasses_from_any_layout(cifar100_parquet, cifar100_tar, tmp_path, cifar100_arrays):
    """`--label-column coarse_label`: the pickle layout ignored it (trained the 100 fine classes) and the Hub
    layout counted the 20 classes again as 20 superclasses. Now both train the 20 superclasses, with no
    superclass level above them; a column the pickle layout lacks is refused, as image folders refuse columns."""
    full = load_raw(str(cifar100_tar), cache=False)
    for source in (cifar100_tar, cifar100_parquet):
        raw = load_raw(str(source), label_column="coarse_label", cache=False)
        assert raw.fine_names == COARSE_NAMES and raw.coarse_names is None
        for name, split in raw.splits.items():
            assert torch.equal(split.fine, full.splits[name].coarse) and split.coarse is None
    with pytest.raises(DataError, match="--label-column label_x: .* has the columns label, labels, fine_label"):
        load_raw(str(cifar100_tar), label_column="label_x", cache=False)
    with pytest.raises(DataError, match="--image-column pixels: "):
        load_raw(str(cifar100_tar), image_column="pixels", cache=False)
    images, fine, _ = cifar100_arrays["train"]
    for i in range(2):
        (tmp_path / "folder" / FINE_NAMES[int(fine[i])]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / "folder" / FINE_NAMES[int(fine[i])] / f"{i}.png")
    with pytest.raises(DataError, match="an image folder has no columns .* leave out --label-column"):
        load_raw(str(tmp_path / "folder"), label_column="coarse_label", cache=False)


def test_a_datasets_cache_it_cannot_write_is_named_not_the_data(cifar100_parquet, monkeypatch):
    """A read-only HOME: the datasets library's cache failure read as "could not be read as parquet"."""
    import errno

    import datasets

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/home/me/.cache")

    monkeypatch.setattr(datasets, "load_dataset", read_only)
    with pytest.raises(DataError, match=r"cannot write its cache \(Read-only file system: /home/me/.cache\); "
                                        r"point HF_HOME"):
        load_raw(str(cifar100_parquet), cache=False)


def test_image_folder_skips_hidden_files_and_refuses_classes_only_in_test(tmp_path, cifar100_arrays):
    """Dot-files and dot-folders (.ipynb_checkpoints, macOS's ._x.png twins) are not data; a class folder that
    only the test split has could never be predicted right, so it is named, not trained as an empty class."""
    images, _, _ = cifar100_arrays["train"]
    for split in ("train", "test"):
        for i, name in enumerate(["cat", "dog"] * 3):
            (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "train" / ".ipynb_checkpoints" / "0.png")
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # an AppleDouble file
    raw = load_raw(str(tmp_path), cache=False)
    assert raw.fine_names == ["cat", "dog"] and len(raw.splits["train"]) == 6
    (tmp_path / "test" / "zebra").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "test" / "zebra" / "0.png")
    with pytest.raises(DataError, match=r"class folder\(s\) \['zebra'\] of split 'test' do not appear in split "
                                        "'train'"):
        load_raw(str(tmp_path), cache=False)


def test_empty_cells_and_missing_files_are_named(tmp_path):
    """A null image cell is an unreadable row, and the message gives the first row's reason; image paths stored
    relative to the dataset's folder are found there, wherever the command runs."""
    import datasets
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"img": [_png(), None, _png()], "label": [0, 1, 0]}
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) at rows \[1\] \(the first: ValueError: no image"):
        load_raw(_parquet(tmp_path / "null", rows, feats), cache=False)
    root = tmp_path / "paths"
    (root / "images").mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (32, 32), colour).save(root / "images" / f"{i}.png")
    _parquet(root, {"file": ["images/0.png", "images/1.png"], "label": [0, 1]})
    raw = load_raw(str(root), image_column="file", cache=False)
    assert raw.splits["train"].images[1, :, 0, 0].tolist() == [0, 0, 255]
    _parquet(root, {"file": ["images/0.png", "images/gone.png"], "label": [0, 1]})
    with pytest.raises(DataError, match=r"rows \[1\] \(the first: FileNotFoundError: .*images/gone.png"):
        load_raw(str(root), image_column="file", cache=False)


def test_a_test_split_name_the_source_lacks_is_refused_when_it_has_others(cifar100_parquet, tmp_path, monkeypatch):
    """--test-split validation on a source with train and test splits: an error naming them, never a share of
    the training images held out in its place (a source with a train split alone still gets one); a dataset
    path under ~ is expanded here, as a shell would."""
    with pytest.raises(DataError, match=r"has no split 'validation' \(it has test, train\); choose another with "
                                        "--test-split"):
        load_bundle(str(cifar100_parquet), test_split="validation")
    monkeypatch.setenv("HOME", str(cifar100_parquet.parent))
    bundle = load_bundle(f"~/{cifar100_parquet.name}")
    assert len(bundle.test) == 200 and bundle.test_held_out is None


def test_cifar10_python_pickles_load_as_the_parquet_copy(tmp_path):
    """torchvision's download (cifar-10-python.tar.gz: cifar-10-batches-py/ with five training batches, a test
    batch and batches.meta) loads as a folder and as the archive, to the same tensors as a parquet copy."""
    import tarfile

    from conftest import make_arrays, write_parquet

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    arrays = {"train": make_arrays(5, 1, num_classes=10), "test": make_arrays(2, 2, num_classes=10)}
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for split, files in [("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])]:
        images, fine, _ = arrays[split]
        for name, rows in zip(files, np.array_split(np.arange(len(fine)), len(files))):
            batch = {b"batch_label": name.encode(), b"labels": fine[rows].tolist(),
                     b"data": images[rows].transpose(0, 3, 1, 2).reshape(len(rows), -1)}
            (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}))
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    parquet = load_raw(str(write_parquet(arrays, tmp_path / "parquet", names, None)), cache=False)
    for source in (folder, tmp_path, tmp_path / "cifar-10-python.tar.gz"):
        raw = load_raw(str(source), cache=False)
        assert raw.fine_names == names and raw.coarse_names is None and raw.fingerprint == parquet.fingerprint
        for split in ("train", "test"):
            assert torch.equal(raw.splits[split].images, parquet.splits[split].images)
            assert torch.equal(raw.splits[split].fine, parquet.splits[split].fine)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="holds no parquet files, no save_to_disk dataset, no cifar-100-python or "
                                        "cifar-10-batches-py files"):
        load_raw(str(folder), cache=False)
