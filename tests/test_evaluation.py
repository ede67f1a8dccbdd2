"""Metrics against hand-computed examples, label alignment, exact multi-process gathering, plots, report and
the evaluate CLI on the fixture dataset and model folders."""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from cifar100_meta import COARSE_NAMES, FINE_NAMES, FINE_TO_COARSE

from cifar_tl import evaluate, evaluation
from cifar_tl.data import DatasetBundle, Split
from cifar_tl.evaluation import collect_logits
from cifar_tl.inference import Predictor
from cifar_tl.metrics import (
    EvaluationError,
    align_labels,
    compute_metrics,
    confusion_matrix,
    load_label_map,
    reliability_bins,
    top_confused_pairs,
)
from cifar_tl.report import headline, headline_markdown, write_report

# Hand example: 4 images, 6 fine classes in 2 superclasses (0-2 -> 0, 3-5 -> 1).
PROBS = torch.tensor([
    [0.70, 0.10, 0.05, 0.05, 0.05, 0.05],  # true 0: right (conf .70); coarse .85/.15 right
    [0.50, 0.30, 0.05, 0.05, 0.05, 0.05],  # true 1: wrong (conf .50); coarse .85/.15 right
    [0.05, 0.05, 0.05, 0.18, 0.62, 0.05],  # true 4: right (conf .62); coarse .15/.85 right
    [0.70, 0.05, 0.05, 0.10, 0.09, 0.01],  # true 5: wrong (conf .70), outside the top 5; coarse .80/.20 wrong
])
FINE = torch.tensor([0, 1, 4, 5])
COARSE = torch.tensor([0, 0, 1, 1])
NAMES = ["a", "b", "c", "d", "e", "f"]
SUPER = ["abc", "def"]
F2C = [0, 0, 0, 1, 1, 1]


def hand_metrics() -> dict:
    return compute_metrics(PROBS.log(), FINE, fine_names=NAMES, coarse=COARSE, coarse_names=SUPER,
                           fine_to_coarse=F2C)


def test_metrics_match_hand_computed_example():
    m = hand_metrics()
    assert m["n"] == 4
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top5"] == pytest.approx(3 / 4)  # only image 3's true class is outside its top 5
    assert m["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.62) + math.log(0.01)) / 4,
                                      rel=1e-5)
    # ECE, 15 bins: bin [.667,.733) holds images 0 and 3 (acc 1/2, conf .70), bin [.467,.533) image 1
    # (acc 0, conf .50), bin [.6,.667) image 2 (acc 1, conf .62)
    assert m["ece"] == pytest.approx(2 / 4 * 0.2 + 1 / 4 * 0.5 + 1 / 4 * 0.38, abs=1e-6)
    assert m["coarse_top1"] == pytest.approx(3 / 4)
    assert m["per_class"] == pytest.approx({"a": 1.0, "b": 0.0, "e": 1.0, "f": 0.0})  # c, d absent
    assert m["per_superclass"] == pytest.approx({"abc": 1.0, "def": 0.5})


def test_metrics_without_coarse_labels_and_empty_split():
    m = compute_metrics(PROBS.log(), FINE, fine_names=NAMES)
    assert "coarse_top1" not in m and "per_superclass" not in m
    with pytest.raises(EvaluationError, match="empty"):
        compute_metrics(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), fine_names=NAMES)


def test_reliability_bins_hand_example_and_ece():
    bins = reliability_bins(PROBS, FINE)
    assert len(bins) == 15 and bins["count"].sum() == 4
    used = bins[bins["count"] > 0]
    assert used.index.tolist() == [7, 9, 10]
    assert used["count"].tolist() == [1, 1, 2]
    assert used["accuracy"].tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert used["confidence"].tolist() == pytest.approx([0.5, 0.62, 0.7])
    ece = float((used["count"] / 4 * (used["accuracy"] - used["confidence"]).abs()).sum())
    assert ece == pytest.approx(hand_metrics()["ece"], abs=1e-6)


def test_confusion_and_top_pairs():
    cm = confusion_matrix(PROBS, FINE, 6)
    assert cm[0, 0] == 1 and cm[1, 0] == 1 and cm[4, 4] == 1 and cm[5, 0] == 1 and cm.sum() == 4
    pairs = top_confused_pairs(cm, NAMES, k=5)
    assert sorted(zip(pairs["true"], pairs["predicted"])) == [("b", "a"), ("f", "a")]
    assert pairs["count"].tolist() == [1, 1] and pairs["share"].tolist() == [1.0, 1.0]


def test_headline_numbers_and_markdown():
    m = hand_metrics()
    h = headline(m, n_worst=2)
    assert h["top1"] == m["top1"] and h["coarse_top1"] == m["coarse_top1"]
    assert h["worst_classes"] == [("b", 0.0), ("f", 0.0)]
    text = headline_markdown(m, tta=m)
    assert "| fine top-1 | 50.00% | 50.00% |" in text
    assert "| fine top-5 | 75.00% | 75.00% |" in text
    assert "| coarse top-1 (superclass) | 75.00% | 75.00% |" in text
    assert f"| ECE (15 bins) | {m['ece']:.4f} |" in text
    assert "| b | 0.00% |" in text
    supers = sorted(m["per_superclass"].items(), key=lambda item: (item[1], item[0]))
    assert "**Superclasses, weakest first**" in text
    assert all(f"| {name} | {acc:.2%} |" in text for name, acc in supers)


def test_align_labels():
    assert align_labels(NAMES, NAMES) == list(range(6))
    assert align_labels(NAMES, NAMES[::-1]) == list(range(6))[::-1]  # same classes, matched by name
    with pytest.raises(EvaluationError, match="--label-map"):
        align_labels(NAMES, ["a", "b", "zebra"])
    assert align_labels(NAMES, ["a", "b", "zebra"], {"zebra": "f"}) == [0, 1, 5]
    with pytest.raises(EvaluationError, match="not dataset classes"):
        align_labels(NAMES, ["a", "b"], {"x": "a"})
    with pytest.raises(EvaluationError, match="one class"):  # nothing to tell apart: top-1 would be 1.0
        align_labels(NAMES, ["a"], {})
    with pytest.raises(EvaluationError, match="not model classes"):
        align_labels(NAMES, ["a", "zebra"], {})
    with pytest.raises(EvaluationError, match="same model class"):
        align_labels(NAMES, ["a", "b"], {"b": "a"})


def test_load_label_map_errors(tmp_path):
    with pytest.raises(EvaluationError, match="file not found"):
        load_label_map(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EvaluationError, match="not valid JSON"):
        load_label_map(bad)
    bad.write_text('["a", "b"]')
    with pytest.raises(EvaluationError, match="JSON object"):
        load_label_map(bad)


def _gather_in_two_processes():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from cifar_tl.data import make_loader

    AcceleratorState._reset_state(True)  # the parent's single-process state was inherited by fork
    accelerator = Accelerator()
    assert accelerator.num_processes == 2
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))  # same weights in both
    split = Split(torch.randint(0, 255, (13, 3, 2, 2), dtype=torch.uint8), torch.arange(13) % 4)
    loader = accelerator.prepare(make_loader(split, 4, shuffle=False))  # 13 = 2 x 4 + 5: padded shards
    out = collect_logits(model, loader, lambda x: x.float(), accelerator)
    assert torch.equal(out["fine"], split.fine)
    assert torch.allclose(out["logits"], model(split.images.float()), atol=1e-6)
    flip = collect_logits(model, loader, lambda x: x.float(), accelerator, tta=1)  # plain logits gathered too
    assert torch.equal(flip["fine"], split.fine) and torch.allclose(flip["plain_logits"], out["logits"])
    x = split.images.float()
    assert torch.allclose(flip["logits"], (model(x) + model(x.flip(-1))) / 2, atol=1e-6)


def test_collect_logits_exact_with_two_processes():
    from accelerate import debug_launcher

    debug_launcher(_gather_in_two_processes, num_processes=2)


class CountingModel(torch.nn.Module):
    """A linear classifier of 4x4 images that counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.linear, self.images = torch.nn.Linear(48, 3), 0

    def forward(self, x):
        self.images += len(x)
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("level, views", [(1, 2), (2, 6)])
def test_tta_evaluation_runs_one_pass_that_gives_the_plain_results_too(level, views):
    """With TTA the split is run once: the first view is the image itself, so the plain results come from the
    same forwards (they used to cost a pass of their own), and they equal a plain evaluation's."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    split = Split(torch.randint(0, 255, (10, 3, 4, 4), dtype=torch.uint8), torch.arange(10) % 3)
    bundle = DatasetBundle(split, split, split, ["a", "b", "c"], None, None, "f" * 16, "toy")
    model, accelerator = CountingModel().eval(), Accelerator(cpu=True)
    transform = lambda x: x.float() / 255
    plain, plain_logits = evaluation.evaluate_split(model, split, bundle, transform, accelerator, batch_size=4)
    assert model.images == 10
    model.images = 0
    both, logits = evaluation.evaluate_split(model, split, bundle, transform, accelerator, batch_size=4, tta=level)
    assert model.images == 10 * views  # one forward per view, none repeated for the plain results
    assert torch.allclose(logits, plain_logits) and both["plain"]["top1"] == plain["plain"]["top1"]
    assert 0 < both["plain"]["seconds"] < both["tta"]["seconds"]  # the plain share of the one pass
    from cifar_tl.tta import multiview_logits
    with torch.no_grad():
        expected = multiview_logits(model, transform(split.images), level)
    assert both["tta"]["top1"] == compute_metrics(expected, split.fine, fine_names=bundle.fine_names)["top1"]


def test_write_report_without_superclasses(tmp_path):
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    split = Split(images, torch.tensor([0, 1, 2, 0, 1, 2]))
    bundle = DatasetBundle(split, split, split, ["cat", "dog", "ship"], None, None, "f" * 16, "toy")
    logits = torch.eye(3)[[0, 1, 2, 1, 1, 2]] * 3
    m = compute_metrics(logits, split.fine, fine_names=bundle.fine_names)
    history = tmp_path / "history.jsonl"
    rows = [{"epoch": e, "train_loss": 2 - e / 3, "val_loss": v_loss, "train_top1": e / 5, "val_top1": v_acc}
            for e, v_loss, v_acc in [(1, 1.5, 0.3), (2, 1.2, 0.4), (3, 1.3, 0.38)]]
    history.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = write_report(tmp_path, results={"plain": m}, logits=logits, bundle=bundle, split="test",
                          info={"model": "toy"}, history=history)
    text = report.read_text()
    for png in ("training_curves", "confusion", "top_confusions", "predictions", "reliability"):
        assert (tmp_path / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"(plots/{png}.png)" in text
    assert "## Confusion matrix" in text and "83.33%" in text  # 5 of 6 right, no superclasses
    with pytest.raises(ValueError, match="logits"):
        write_report(tmp_path, results={"plain": m}, logits=logits[:2], bundle=bundle, info={})


def test_evaluate_cli_writes_metrics_report_and_plots(cnn_model_dir, cifar100_parquet, tmp_path):
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(cnn_model_dir), "--dataset", str(cifar100_parquet), "--split",
                          "test", "--output-dir", str(out), "--tta", "--batch-size", "64"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 200 and metrics["split"] == "test" and metrics["model"] == str(cnn_model_dir)
    assert metrics["backend"] == "onnx"  # auto: ONNX Runtime on a CPU
    assert len(metrics["dataset_fingerprint"]) == 16
    expected = {"top1", "top5", "coarse_top1", "loss", "ece", "per_class", "per_superclass", "tta"}
    assert expected <= set(metrics)
    assert set(metrics["per_class"]) == set(FINE_NAMES)
    assert set(metrics["per_superclass"]) == set(COARSE_NAMES)
    assert metrics["tta"]["n"] == 200 and "coarse_top1" in metrics["tta"]
    # the same numbers as the Predictor's own preprocessing and forward pass
    from cifar_tl.data import load_bundle

    test = load_bundle(str(cifar100_parquet)).test
    predictor = Predictor.from_dir(cnn_model_dir, device="cpu")
    direct = compute_metrics(predictor.logits(test.images), test.fine, coarse=test.coarse,
                             fine_names=FINE_NAMES, coarse_names=COARSE_NAMES, fine_to_coarse=FINE_TO_COARSE)
    for key in ("top1", "top5", "coarse_top1", "loss", "ece"):
        assert metrics[key] == pytest.approx(direct[key], abs=1e-5)
    text = (out / "report.md").read_text()
    assert "| fine top-1 |" in text and "flip TTA" in text and "Worst 10 classes" in text
    for png in ("confusion", "predictions", "reliability"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 5000


def test_evaluate_backends_agree(cnn_model_dir, cifar100_parquet, tmp_path):
    """torch, onnx (the CPU default) and an exported .onnx file give the same metrics, TTA included."""
    from cifar_tl.onnx_backend import export_onnx

    onnx_file = export_onnx(Predictor.from_dir(cnn_model_dir, device="cpu"), tmp_path / "model.onnx")
    runs = {}
    for name, model, backend in [("torch", cnn_model_dir, "torch"), ("onnx", cnn_model_dir, "onnx"),
                                 ("file", onnx_file, "auto")]:
        out = tmp_path / name
        assert evaluate.main(["--model", str(model), "--dataset", str(cifar100_parquet), "--output-dir", str(out),
                              "--tta", "--backend", backend]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    assert [runs[n]["backend"] for n in runs] == ["torch", "onnx", "onnx"]
    for name in ("onnx", "file"):
        for result, reference in [(runs[name], runs["torch"]), (runs[name]["tta"], runs["torch"]["tta"])]:
            for key in ("top1", "top5", "coarse_top1", "loss", "ece"):
                assert result[key] == pytest.approx(reference[key], abs=1e-4), (name, key)


def test_evaluate_reads_a_test_only_source(cnn_model_dir, cifar100_arrays, cifar100_parquet, tmp_path, capsys):
    """A source with a test split and no train split (a held-out set on its own) is evaluated as it is; only a
    split that comes from the train split (val, train) needs one."""
    from conftest import write_parquet

    test_only = write_parquet({"test": cifar100_arrays["test"]}, tmp_path / "test_only")
    runs = {}
    for name, dataset in [("full", cifar100_parquet), ("test_only", test_only)]:
        assert evaluate.main(["--model", str(cnn_model_dir), "--dataset", str(dataset), "--output-dir",
                              str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["test_only"]["n"] == 200
    for key in ("top1", "top5", "coarse_top1", "loss"):
        assert runs["test_only"][key] == pytest.approx(runs["full"][key], abs=1e-6), key
    capsys.readouterr()
    assert evaluate.main(["--model", str(cnn_model_dir), "--dataset", str(test_only), "--split", "val",
                          "--output-dir", str(tmp_path / "val")]) == 2
    assert "has no split 'train' (it has test)" in capsys.readouterr().err.splitlines()[-1]
    # a folder of class folders (one split, "train"): a held-out share by default, all of it on request
    from PIL import Image

    images, fine, _ = cifar100_arrays["test"]
    for i, (image, label) in enumerate(zip(images, fine.tolist())):
        (tmp_path / "photos" / FINE_NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "photos" / FINE_NAMES[label] / f"{i}.png")
    args = ["--model", str(cnn_model_dir), "--dataset", str(tmp_path / "photos"), "--output-dir",
            str(tmp_path / "photos_eval")]
    assert evaluate.main(args) == 0  # its held-out 10 %, as train.py holds it out
    assert json.loads((tmp_path / "photos_eval" / "metrics.json").read_text())["n"] == 20
    assert evaluate.main([*args, "--test-split", "train"]) == 0  # all of it
    metrics = json.loads((tmp_path / "photos_eval" / "metrics.json").read_text())
    assert metrics["n"] == 200 and metrics["top1"] == pytest.approx(runs["full"]["top1"], abs=1e-6)


def test_a_small_sample_gets_superclass_metrics_from_the_models_map(cnn_model_dir, cifar100_arrays, tmp_path):
    """20 labelled CIFAR-100 images show ~20 of the 100 classes: the model's map supplies the other superclasses
    (rows that contradict it turn superclass metrics off instead)."""
    from conftest import write_parquet

    images, fine, coarse = cifar100_arrays["test"]
    pick = list(range(0, 200, 10))  # 20 images: at most 20 of the 100 classes
    sample = write_parquet({"test": (images[pick], fine[pick], coarse[pick])}, tmp_path / "sample")
    assert evaluate.main(["--model", str(cnn_model_dir), "--dataset", str(sample), "--output-dir",
                          str(tmp_path / "ok")]) == 0
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    predictor = Predictor.from_dir(cnn_model_dir, device="cpu")
    probs = predictor.logits(torch.from_numpy(images[pick]).permute(0, 3, 1, 2)).softmax(-1)
    super_probs = torch.zeros(20, 20).index_add_(1, torch.tensor(FINE_TO_COARSE), probs)
    expected = (super_probs.argmax(-1) == torch.as_tensor(coarse[pick])).float().mean().item()
    assert metrics["n"] == 20 and metrics["coarse_top1"] == pytest.approx(expected, abs=1e-6)
    wrong = coarse[pick].copy()
    wrong[0] = (wrong[0] + 1) % 20  # a row that puts its class under another superclass than the model does
    contradicts = write_parquet({"test": (images[pick], fine[pick], wrong)}, tmp_path / "contradicts")
    assert evaluate.main(["--model", str(cnn_model_dir), "--dataset", str(contradicts), "--output-dir",
                          str(tmp_path / "off")]) == 0
    assert "coarse_top1" not in json.loads((tmp_path / "off" / "metrics.json").read_text())


@pytest.fixture
def renamed_model_dir(cnn_model_dir, tmp_path):
    """The fixture model with one class renamed: its labels no longer match the dataset's."""
    model = shutil.copytree(cnn_model_dir, tmp_path / "renamed")
    config = json.loads((model / "config.json").read_text())
    config["label_names"] = ["big_apple" if n == "apple" else n for n in config["label_names"]]
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_evaluate_refuses_mismatched_labels_unless_mapped(renamed_model_dir, cifar100_parquet, tmp_path,
                                                          capsys):
    args = ["--model", str(renamed_model_dir), "--dataset", str(cifar100_parquet), "--output-dir",
            str(tmp_path)]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert "do not match" in err and "'big_apple'" in err and "--label-map" in err and "Traceback" not in err
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"apple": "big_apple"}))
    assert evaluate.main([*args, "--label-map", str(label_map)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "apple" in metrics["per_class"] and metrics["label_map"] == str(label_map)


@pytest.mark.parametrize("extra, message", [
    (["--split", "val", "--val-fraction", "0"], "--split val of --dataset .* is empty"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such model folder"),
    (["--label-map", "/no/such/map.json"], "--label-map /no/such/map.json: file not found"),
])
def test_evaluate_bad_input_gives_one_clear_error(cnn_model_dir, cifar100_parquet, tmp_path, capsys, extra,
                                                  message):
    args = ["--model", str(cnn_model_dir), "--dataset", str(cifar100_parquet), "--output-dir", str(tmp_path)]
    assert evaluate.main(args + extra) == 2
    err = capsys.readouterr().err  # a first load of the parquet prints datasets' progress lines before it
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [err.splitlines()[-1]], err
    assert "Traceback" not in err and re.search(message, err), err


def test_a_class_without_test_images_is_grey_in_the_confusion_plot_not_zero(tmp_path):
    """A small sample (CIFAR-100's first 20 test images) leaves superclasses without images: their rows are
    masked grey with a dash, not drawn as 0 % right."""
    import numpy as np
    from PIL import Image

    from cifar_tl import plots

    grey = []  # share of the figure in matplotlib's "0.85", the masked cells' colour (a few pixels of text too)
    for counts in ([[5, 1, 0], [0, 0, 0], [1, 0, 3]], [[5, 1, 0], [0, 2, 0], [1, 0, 3]]):
        path = plots.confusion(torch.tensor(counts), ["a", "b", "c"], tmp_path / "c.png", "superclasses")
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
        grey.append((np.abs(pixels - 216) <= 1).all(1).mean())
    assert grey[0] > 0.1 and grey[1] < 0.01, grey  # one row of three: about a fifth of the figure


def test_top5_is_left_out_with_five_classes_or_fewer():
    """With 3 classes every label is in the top 5: "top5 1.0000" measured nothing."""
    logits, fine = torch.randn(12, 3), torch.arange(12) % 3
    metrics = compute_metrics(logits, fine, fine_names=["a", "b", "c"])
    assert "top5" not in metrics and "fine top-5" not in headline_markdown(metrics)
    assert "top5" in compute_metrics(torch.randn(12, 6), torch.arange(12) % 6, fine_names=list("abcdef"))


def _with_train_config(model_dir, out, **train_config):
    """A copy of a model folder whose config.json records a training run's settings."""
    model = shutil.copytree(model_dir, out)
    config = json.loads((model / "config.json").read_text())
    config["cifar_tl"]["train_config"] = train_config
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_evaluate_follows_the_runs_own_data_settings(cnn_model_dir, cifar100_parquet, tmp_path):
    """On the dataset it trained on, evaluate splits it as the run did: --split train is the subset the run
    trained on (--max-train-samples), not the whole train split; on another dataset the run's settings of that
    kind mean nothing and are not applied."""
    model = _with_train_config(cnn_model_dir, tmp_path / "m", dataset=str(cifar100_parquet), max_train_samples=50,
                               val_fraction=0.1, seed=42)
    args = ["--model", str(model), "--split", "train", "--backend", "torch"]
    assert evaluate.main([*args, "--dataset", str(cifar100_parquet), "--output-dir", str(tmp_path / "own")]) == 0
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["n"] == 50
    copy = shutil.copytree(cifar100_parquet, tmp_path / "copy")
    assert evaluate.main([*args, "--dataset", str(copy), "--output-dir", str(tmp_path / "other")]) == 0
    assert json.loads((tmp_path / "other" / "metrics.json").read_text())["n"] == 360  # 400 less the 10 % val


def test_evaluate_reads_the_label_column_the_model_trained_on(cifar100_parquet, tmp_path):
    """A model trained on the superclasses (--label-column coarse_label) is evaluated on them by default."""
    from cifar_tl.config import TrainConfig
    from cifar_tl.model_folder import folder_config, write_model_folder
    from cifar_tl.models import create_model, data_config

    train_config = TrainConfig(model="baseline_cnn_bn", dataset=str(cifar100_parquet), label_column="coarse_label")
    train_config.validate()  # the model-aware defaults, as a run records them
    model = create_model("baseline_cnn_bn", pretrained=False, num_classes=20).eval()
    dc = data_config(model, None)
    cfg = folder_config(model, image_size=dc["image_size"], mean=dc["mean"], std=dc["std"], data_size=32,
                        fine_names=COARSE_NAMES, coarse_names=None, fine_to_coarse=None,
                        train_config=train_config.to_dict())
    folder = write_model_folder(tmp_path / "coarse", model, cfg)
    assert evaluate.main(["--model", str(folder), "--dataset", str(cifar100_parquet), "--backend", "torch",
                          "--output-dir", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n"] == 200 and sorted(metrics["per_class"]) == sorted(COARSE_NAMES)


def test_evaluate_with_onnx_fits_images_of_another_size(cnn_model_dir, cifar100_arrays, tmp_path):
    """A source of one square size other than the model's (64 px images, a 32 px model) keeps its own size in
    the store; the ONNX graph takes the model's size, so evaluation fits each image as predict does."""
    from conftest import write_parquet

    images, fine, coarse = cifar100_arrays["test"]
    big = np.repeat(np.repeat(images[:40], 2, axis=1), 2, axis=2)  # 64 x 64
    dataset = write_parquet({"test": (big, fine[:40], coarse[:40])}, tmp_path / "big")
    assert evaluate.main(["--model", str(cnn_model_dir), "--dataset", str(dataset), "--backend", "onnx",
                          "--output-dir", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    predictor = Predictor.from_dir(cnn_model_dir, device="cpu")
    logits = predictor.logits(predictor.preprocess(list(big)))
    expected = torch.nn.functional.cross_entropy(logits, torch.as_tensor(fine[:40])).item()
    assert metrics["n"] == 40 and metrics["backend"] == "onnx" and metrics["loss"] == pytest.approx(expected, abs=1e-4)


def test_evaluate_refuses_before_working(cnn_model_dir, cifar100_parquet, tmp_path, capsys):
    """An --output-dir that is a file, and --backend torch for an .onnx file, are refused at once."""
    (tmp_path / "file").write_text("x")
    args = ["--model", str(cnn_model_dir), "--dataset", str(cifar100_parquet)]
    assert evaluate.main([*args, "--output-dir", str(tmp_path / "file" / "sub")]) == 2
    assert capsys.readouterr().err.strip().endswith("file is a file, not a folder")
    args = ["--model", str(tmp_path / "m.onnx"), "--dataset", str(cifar100_parquet), "--backend", "torch"]
    assert evaluate.main([*args, "--output-dir", str(tmp_path / "out")]) == 2
    assert "cannot apply" in capsys.readouterr().err
