import json

import pandas as pd
from cifar100_meta import COARSE_NAMES, FINE_NAMES, FINE_TO_COARSE

from cifar_tl.eda import main


def test_eda_writes_balance_summary_and_samples(cifar100_parquet, tmp_path):
    assert main(["--dataset", str(cifar100_parquet), "--output-dir", str(tmp_path)]) == 0
    balance = pd.read_csv(tmp_path / "class_balance.csv")
    assert balance["fine_name"].tolist() == FINE_NAMES
    assert balance["coarse_name"].tolist() == [COARSE_NAMES[c] for c in FINE_TO_COARSE]
    assert balance["train"].tolist() == [4] * 100 and balance["test"].tolist() == [2] * 100
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sizes"] == {"train": 400, "test": 200}
    assert summary["num_fine_classes"] == 100 and summary["num_coarse_classes"] == 20
    assert summary["image_shape"] == [3, 32, 32] and summary["balanced"]
    assert set(summary["duplicates"]) == {"within_train", "within_test", "between_test_train"}
    assert (tmp_path / "samples.png").stat().st_size > 10_000


def test_eda_reports_unreadable_rows_and_duplicates(tmp_path):
    import io

    import datasets
    from PIL import Image

    def png(c):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (c, c, c)).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"img": [png(1), {"bytes": b"junk", "path": None}, png(1), png(2)], "label": [0, 1, 0, 1]}
    (tmp_path / "data").mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / "data" / f"{split}-0.parquet"))
    assert main(["--dataset", str(tmp_path), "--output-dir", str(tmp_path / "eda")]) == 0
    summary = json.loads((tmp_path / "eda" / "summary.json").read_text())
    assert summary["unreadable_rows"] == {"train": [1], "test": [1]}
    assert summary["sizes"] == {"train": 3, "test": 3}
    assert summary["duplicates"]["within_train"] == 1 and summary["duplicates"]["between_test_train"] == 2


def test_eda_bad_dataset_is_one_line(tmp_path, capsys):
    assert main(["--dataset", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")  # refused before the data is read, not after
    assert main(["--dataset", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --output-dir {tmp_path / 'file'}: {tmp_path / 'file'} is a " \
                                              "file, not a folder"


def test_eda_takes_the_splits_a_source_has(cifar100_arrays, tmp_path, capsys):
    """Without --splits, a test-only source (or a folder of class folders: one split) is described as it is;
    an explicit --splits that the source lacks is one line naming the flag."""
    from conftest import write_parquet

    test_only = write_parquet({"test": cifar100_arrays["test"]}, tmp_path / "test_only")
    assert main(["--dataset", str(test_only), "--output-dir", str(tmp_path / "eda")]) == 0
    summary = json.loads((tmp_path / "eda" / "summary.json").read_text())
    assert summary["sizes"] == {"test": 200} and summary["num_coarse_classes"] == 20
    assert (tmp_path / "eda" / "samples.png").is_file()
    assert main(["--dataset", str(test_only), "--splits", "train", "--output-dir", str(tmp_path / "o")]) == 2
    assert "has no split 'train' (it has test); choose with --splits" in capsys.readouterr().err
