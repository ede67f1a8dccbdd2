"""Batch prediction CLI and the image guards every entry point shares (`open_image` + `to_thumbnail`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_tl.inference import ImageError, Predictor, open_image
from cifar_tl.predict import main


def write_image_zoo(images: np.ndarray, folder: Path) -> dict[str, Path]:
    """The awkward inputs a demo meets: every one must be predicted (the `ok_*` files) or refused with a
    message (the `bad_*` files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(images[0]).resize((48, 40))
    files = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        files[name] = folder / name
        img.save(files[name], **kw)

    save("ok_rgb.png", Image.fromarray(images[1]))
    save("ok_gray.png", rgb.convert("L"))
    save("ok_rgba.png", rgb.convert("RGBA"))
    save("ok_palette.gif", rgb.convert("P"))
    save("ok_cmyk.jpg", rgb.convert("CMYK"))
    save("ok_16bit.png", Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer must rotate 90 degrees clockwise
    save("ok_exif_rotated.jpg", rgb.rotate(90, expand=True), exif=exif, quality=95)
    save("ok_tiny.png", Image.new("RGB", (1, 1), (200, 30, 30)))
    save("ok_huge.png", Image.new("L", (8000, 8000), 90))
    files["bad_not_an_image.png"] = folder / "bad_not_an_image.png"
    files["bad_not_an_image.png"].write_text("this is text, not a PNG")
    files["bad_truncated.png"] = folder / "bad_truncated.png"
    files["bad_truncated.png"].write_bytes(files["ok_rgb.png"].read_bytes()[:200])
    return files


@pytest.fixture(scope="module")
def zoo(cifar100_arrays, tmp_path_factory) -> dict[str, Path]:
    return write_image_zoo(cifar100_arrays["test"][0], tmp_path_factory.mktemp("zoo"))


def test_every_kind_of_image_becomes_a_thumbnail_or_a_clear_error(zoo, cnn_model_dir, cifar100_arrays):
    predictor = Predictor.from_dir(cnn_model_dir, "cpu")
    for name, path in zoo.items():
        if name.startswith("ok_"):
            thumb = predictor.to_thumbnail(open_image(path))
            assert thumb.shape == (32, 32, 3) and thumb.dtype == np.uint8, name
        else:
            with pytest.raises(ImageError):
                open_image(path)
    upright = predictor.to_thumbnail(Image.fromarray(cifar100_arrays["test"][0][0]).resize((48, 40)))
    rotated = predictor.to_thumbnail(open_image(zoo["ok_exif_rotated.jpg"])).astype(int)
    assert np.abs(rotated - upright).mean() < 12  # EXIF orientation applied (JPEG noise aside)


def test_predict_takes_file_paths_as_the_pipeline_does(zoo, cnn_model_dir):
    predictor = Predictor.from_dir(cnn_model_dir, "cpu")
    path = zoo["ok_rgb.png"]
    assert predictor.predict([str(path), path]) == predictor.predict([open_image(path)]) * 2
    with pytest.raises(ImageError, match="not an image file"):
        predictor.predict([zoo["bad_not_an_image.png"]])
    assert predictor.predict([]) == []


def test_predict_takes_arrays_as_people_hold_them(cnn_model_dir, cifar100_arrays):
    """Floats in [0, 1] and channels-first arrays (numpy or torch) were refused as "cannot convert to RGB"."""
    import torch

    predictor = Predictor.from_dir(cnn_model_dir, "cpu")
    hwc = cifar100_arrays["test"][0][0]  # uint8 [32, 32, 3]
    expected = predictor.to_thumbnail(hwc)
    for same in (hwc.transpose(2, 0, 1), hwc / 255.0, (hwc / 255.0).astype(np.float32).transpose(2, 0, 1),
                 torch.from_numpy(hwc).permute(2, 0, 1), torch.from_numpy(hwc / 255.0), hwc.astype(np.int64)):
        assert np.array_equal(predictor.to_thumbnail(same), expected)
    assert predictor.to_thumbnail(hwc[..., :1]).shape == expected.shape  # [H, W, 1]: grey
    for bad, message in ((np.zeros((2, 32, 32, 3), np.uint8), "shape (2, 32, 32, 3) is no image"),
                         (hwc * -1.0, "must hold values in [0, 1] or [0, 255]"),
                         (np.full((32, 32, 3), np.nan), "must hold values")):
        with pytest.raises(ImageError, match=re.escape(message)):
            predictor.predict([bad])


def test_pixel_bound_and_decompression_bomb_guard(zoo, monkeypatch):
    with pytest.raises(ImageError, match="megapixel limit"):
        open_image(zoo["ok_huge.png"], max_pixels=1_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL raises past twice this
    with pytest.raises(ImageError, match="far over the 0.01-megapixel limit"):
        open_image(zoo["ok_huge.png"], max_pixels=10_000)


def test_a_large_photo_is_shrunk_before_it_is_converted(tmp_path):
    """An 81-megapixel RGBA upload was copied whole 5-6 times on its way to a 32 px thumbnail (2.7 GB peak, 8 s);
    box-averaged first, its thumbnail is the same picture."""
    from cifar_tl.sources import decode_image, fit_square

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), np.ones((200, 200, 1), np.uint8))
    photo = Image.fromarray(smooth, "RGBA")  # 2400x3200, flat 200 px patches, varying transparency
    shrunk = decode_image(photo, shrink_to=32)
    assert min(shrunk.shape[:2]) < 16 * 32
    full = fit_square(decode_image(photo), 32).astype(int)
    assert np.abs(fit_square(shrunk, 32).astype(int) - full).mean() < 2
    for mode in ("1", "P", "I;16", "LA", "CMYK"):  # modes Pillow cannot box-average directly
        assert decode_image(photo.convert("RGB").convert(mode), shrink_to=32).shape[2] == 3, mode


def test_predict_output_follows_the_file_suffix(zoo, cnn_model_dir, tmp_path):
    """`--output preds.csv` wrote JSON lines; `--output preds.json` a file json.load refused."""
    import csv

    images = [str(zoo["ok_rgb.png"]), str(zoo["ok_gray.png"]), str(zoo["bad_truncated.png"])]
    for name in ("p.json", "p.csv"):
        assert main(["--model", str(cnn_model_dir), *images, "--top-k", "2", "--output", str(tmp_path / name),
                     "--backend", "torch", "--no-progress"]) == 0
    records = json.loads((tmp_path / "p.json").read_text())
    assert [r["path"] for r in records] == images[:2] and len(records[0]["fine"]) == 2
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["path", "label_1", "score_1", "label_2", "score_2", "coarse_label", "coarse_score"]
    assert [(r["path"], r["label_1"], r["coarse_label"]) for r in rows] == \
        [(r["path"], r["fine"][0]["label"], r["coarse"]["label"]) for r in records]
    assert float(rows[0]["score_1"]) == pytest.approx(records[0]["fine"][0]["score"], abs=1e-5)
    assert main(["--model", str(cnn_model_dir), images[2], "--output", str(tmp_path / "p.json"),
                 "--no-progress"]) == 1  # no image read: the earlier predictions are kept, not replaced by []
    assert json.loads((tmp_path / "p.json").read_text()) == records


def test_predict_output_never_replaces_an_image_a_link_or_a_stream(zoo, cnn_model_dir, tmp_path, capsys):
    """`--output *.jpg` made the first photo the predictions file; a link became a file and its target kept the
    old predictions; a FIFO became a file its reader never saw (as root, so did /dev/stdout)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg", "c.dat"):
        shutil.copy(zoo["ok_rgb.png"], photos / name)
    before = (photos / "a.jpg").read_bytes()
    model = ["--model", str(cnn_model_dir), "--backend", "torch", "--no-progress"]
    for out, inputs in ((photos / "a.jpg", [photos / "b.jpg"]), (photos / "c.dat", [photos / "c.dat"])):
        assert main([*model, "--output", str(out), *map(str, inputs)]) == 2
        assert "which the predictions would replace; name a .jsonl" in capsys.readouterr().err
    assert (photos / "a.jpg").read_bytes() == before and (photos / "c.dat").read_bytes() == before
    store = tmp_path / "store"
    store.mkdir()
    (store / "preds.jsonl").write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to(store / "preds.jsonl")
    assert main([*model, "--output", str(tmp_path / "link.jsonl"), str(photos / "b.jpg")]) == 0
    assert (tmp_path / "link.jsonl").is_symlink()
    assert json.loads((store / "preds.jsonl").read_text())["path"] == str(photos / "b.jpg")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with ThreadPoolExecutor(1) as pool:
        read = pool.submit(fifo.read_text)
        assert main([*model, "--output", str(fifo), str(photos / "b.jpg")]) == 0
        assert json.loads(read.result(timeout=60))["path"] == str(photos / "b.jpg")
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_predict_names_each_file_once_and_reports_dead_links(zoo, cnn_model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(zoo["ok_rgb.png"], folder / "a.png")
    (folder / "dead.jpg").symlink_to(tmp_path / "moved-away.jpg")
    out = tmp_path / "p.jsonl"
    assert main(["--model", str(cnn_model_dir), str(folder), str(folder / "a.png"), "--output", str(out),
                 "--backend", "torch", "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 1  # the folder's file, named again, once
    err = capsys.readouterr().err
    assert "dead.jpg (a link to" in err and "predicted 1 image(s), skipped 1" in err
    assert main(["--model", str(tmp_path / "never-loaded"), str(folder), "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --output {tmp_path}: a folder")


def test_predict_piped_into_head_ends_quietly(zoo, cnn_model_dir, tmp_path):
    """`predict ... | head -1` ended in a BrokenPipeError traceback and exit status 1."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):  # ~100 KB of JSON lines: more than a pipe holds
        shutil.copy(zoo["ok_tiny.png"], folder / f"{i:03d}.png")
    command = (f"{sys.executable} -m cifar_tl.predict --model {cnn_model_dir} {folder} --backend torch "
               "--no-progress | head -1")
    res = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300,
                         check=False, cwd=Path(__file__).parents[1])
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert json.loads(res.stdout)["path"].endswith("000.png")


def test_predict_cli_writes_jsonl_and_skips_unreadable(zoo, cnn_model_dir, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    folder = zoo["ok_rgb.png"].parent
    rc = main(["--model", str(cnn_model_dir), str(folder), str(tmp_path / "missing.png"), "--top-k", "3",
               "--output", str(out), "--batch-size", "4"])
    assert rc == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ok = sorted(str(p) for n, p in zoo.items() if n.startswith("ok_"))
    assert sorted(line["path"] for line in lines) == ok
    assert all(len(line["fine"]) == 3 and line["coarse"]["label"] for line in lines)
    err = capsys.readouterr().err
    assert "bad_not_an_image.png: not an image file" in err and "bad_truncated.png" in err
    assert "missing.png: no such file" in err and "predicted 9 image(s), skipped 3" in err

    expected = Predictor.from_dir(cnn_model_dir, "cpu").predict([open_image(zoo["ok_rgb.png"])], top_k=3)[0]
    got = next(line for line in lines if line["path"].endswith("ok_rgb.png"))
    assert [c["label"] for c in got["fine"]] == [c["label"] for c in expected["fine"]]
    assert got["fine"][0]["score"] == pytest.approx(expected["fine"][0]["score"], abs=1e-5)


def test_predict_runs_as_the_readme_writes_it(cnn_model_dir, zoo, tmp_path):
    """`python -m cifar_tl.predict` as a module: a helper defined below the `__main__` guard was not yet defined
    when main() ran there (NameError), while in-process calls passed."""
    out = tmp_path / "preds.jsonl"
    res = subprocess.run([sys.executable, "-m", "cifar_tl.predict", "--model", str(cnn_model_dir),
                          str(zoo["ok_rgb.png"]), "--output", str(out), "--backend", "torch", "--no-progress"],
                         capture_output=True, text=True, timeout=300, check=False, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [str(zoo["ok_rgb.png"])]


def test_predict_cli_errors_are_one_line(cnn_model_dir, zoo, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), str(zoo["ok_rgb.png"]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model ") and "no such model folder" in err and err.count("\n") == 1
    assert main(["--model", str(cnn_model_dir), str(tmp_path / "empty-nothing")]) == 2
    assert main(["--model", str(cnn_model_dir), str(zoo["bad_not_an_image.png"]), "--no-progress"]) == 1
    capsys.readouterr()
    nowhere = tmp_path / "no-such-folder" / "p.jsonl"
    assert main(["--model", str(cnn_model_dir), str(zoo["ok_rgb.png"]), "--output", str(nowhere)]) == 2
    assert capsys.readouterr().err == f"error: --output {nowhere}: no folder {nowhere.parent}\n"
    for flags, message in ((["--threads", "-1"], "error: --threads -1: must be at least 1\n"),
                           (["--device", "foo"], "error: --device foo: not a torch device (e.g. cpu, cuda, cuda:1, mps)\n")):
        assert main(["--model", str(cnn_model_dir), str(zoo["ok_rgb.png"]), *flags]) == 2
        assert capsys.readouterr().err == message
    assert main(["--model", str(tmp_path / "m.onnx"), str(zoo["ok_rgb.png"]), "--backend", "torch"]) == 2
    assert "runs on ONNX Runtime on the CPU, so --backend torch cannot apply" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(cnn_model_dir), str(zoo["ok_rgb.png"]), "--max-pixels", "0"])
    assert "--max-pixels must be at least 1" in capsys.readouterr().err
