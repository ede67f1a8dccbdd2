"""An independent check of what a model folder or Hub repo claims: the folder loaded as a user of the Hub loads
it, through the 🤗 transformers image-classification pipeline (its timm wrapper, with timm's own preprocessing
from config.json: bilinear resize, crop_pct 1.0, mean/std), scored by 🤗 evaluate's image-classification
evaluator, and compared image for image with the test accuracy the folder records (config.json's
`cifar_tl.metrics`, the same numbers as the run's metrics.json):

    python -m cifar_tl.evaluate --model DIR_OR_HUB_ID --dataset D --via transformers --output-dir OUT

Exit code 0 when the counts of correct images agree (or there is nothing recorded for this dataset and split to
compare with, which it says), 1 when they disagree. It needs the `crosscheck` extra
(`pip install "cifar-tl[crosscheck]"`: evaluate + transformers; a cold `import evaluate` takes 4.8 s on 2 quiet
cores, 12-14 s under load, 2.8 s once torch, transformers and datasets are loaded).
The metric is the local module `hf_metrics/accuracy.py` (evaluate.load("accuracy") needs the Hub).

Only timm architectures can be checked this way: cifar-tl's own CNNs are built by transformers only in a process
that imported cifar_tl, which would make the check depend on the code it checks. Where the numbers can
legitimately differ, the message says so: a run that evaluated in bf16 / fp16 autocast (`mixed_precision` in
metrics.json) or a model that upsamples (cifar-tl resizes on the device, the pipeline with PIL) can move a few
images; a run evaluated in fp32 at the data's own size agrees to the last image."""
from __future__ import annotations

import json
from pathlib import Path

from .architectures import is_own
from .data import DatasetBundle, Split
from .model_folder import run_dir_of, upgrade_config

METRIC = Path(__file__).resolve().parent / "hf_metrics" / "accuracy.py"
INSTALL = 'pip install "cifar-tl[crosscheck]"'


class CrosscheckError(RuntimeError):
    """The cross-check cannot run; the message says why and what to do."""


def check_architecture(config: dict) -> None:
    architecture = upgrade_config(config)["architecture"]
    if is_own(architecture):
        raise CrosscheckError(f"--via transformers: {architecture} is cifar-tl's own architecture, not a timm one; "
                              "the transformers pipeline builds it only in a process that imported cifar_tl, so "
                              "the check would not be independent. Use --via cifar-tl")


def libraries():
    """(evaluate, transformers), imported on demand: together they take seconds to import."""
    try:
        import evaluate
        import transformers
    except ImportError as err:
        raise CrosscheckError(f"--via transformers needs the crosscheck extra ({err.name} is not installed): "
                              f"{INSTALL}") from None
    return evaluate, transformers


def as_hf_dataset(split: Split, names: list[str]):
    """The split as a 🤗 `datasets.Dataset` of PIL images and ClassLabel labels (the pixels cifar-tl decoded)."""
    import datasets
    from PIL import Image

    images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in split.images.cpu()]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": images, "label": split.fine.tolist()}, features=features)


def label_mapping(pipe, names: list[str]) -> dict[str, int]:
    """The model's label name -> the dataset's class id, by name (never by position)."""
    config = pipe.model.config
    model_names = [config.id2label[i] for i in range(config.num_labels)]
    missing = [n for n in model_names if n not in names]
    if missing:
        raise CrosscheckError(f"the model's classes {', '.join(missing[:3])} are not among the dataset's; the "
                              "cross-check maps classes by name (use --via cifar-tl with --label-map)")
    return {n: names.index(n) for n in model_names}


def _evaluator(evaluate, transformers):
    from evaluate.evaluator import ImageClassificationEvaluator

    class PipelineEvaluator(ImageClassificationEvaluator):
        """evaluate 0.4.6's evaluator, given a ready pipeline (its own `prepare_pipeline` tests
        transformers.TFPreTrainedModel, which transformers 5 removed); keeps the predictions it scored."""

        def prepare_pipeline(self, model_or_pipeline, *args, **kwargs):
            if isinstance(model_or_pipeline, transformers.Pipeline):
                return model_or_pipeline
            return super().prepare_pipeline(model_or_pipeline, *args, **kwargs)

        def predictions_processor(self, predictions, label_mapping):
            out = super().predictions_processor(predictions, label_mapping)
            self.predictions = list(out["predictions"])
            return out

    return PipelineEvaluator()


def pipeline_accuracy(folder: Path, split: Split, names: list[str], *, batch_size: int, device: str) -> dict:
    """Accuracy of the folder on `split` through pipeline("image-classification") and evaluate's evaluator."""
    evaluate, transformers = libraries()
    pipe = transformers.pipeline("image-classification", model=str(folder), device=device, batch_size=batch_size)
    evaluator = _evaluator(evaluate, transformers)
    dataset = as_hf_dataset(split, names)
    result = evaluator.compute(model_or_pipeline=pipe, data=dataset, metric=evaluate.load(str(METRIC)),
                               input_column="image", label_column="label", label_mapping=label_mapping(pipe, names))
    labels = split.fine.tolist()
    return {"top1": result["accuracy"], "correct": sum(p == y for p, y in zip(evaluator.predictions, labels)),
            "n": len(labels), "seconds": result["total_time_in_seconds"], "predictions": evaluator.predictions,
            "labels": labels}


def recorded_metrics(folder: Path, config: dict) -> dict:
    """The test metrics the folder records: config.json's `cifar_tl.metrics`, else the run's metrics.json."""
    metrics = (config.get("cifar_tl") or {}).get("metrics") or {}
    run = run_dir_of(folder)
    if not metrics and run is not None:
        metrics = json.loads((run / "metrics.json").read_text())
    return metrics


def compare(observed: dict, recorded: dict, fingerprint: str, split: str, confusion: dict | None) -> dict:
    """Whether the pipeline's count of correct images equals the recorded one (None: nothing to compare), and
    where the folder has its test confusion matrix (confusion.json), how many of its cells differ."""
    where = recorded.get("dataset_fingerprint")
    if "top1" not in recorded or split != "test" or where != fingerprint or recorded.get("n") != observed["n"]:
        return {"agrees": None, "reason": f"nothing recorded to compare with: the folder records test metrics of "
                f"{recorded.get('n', 'no')} images of dataset {where}; this is the {split} split "
                f"({observed['n']} images) of dataset {fingerprint}"}
    expected = round(recorded["top1"] * observed["n"])
    verdict = {"agrees": expected == observed["correct"], "recorded_top1": recorded["top1"],
               "recorded_correct": expected, "difference": observed["correct"] - expected,
               "recorded_mixed_precision": recorded.get("mixed_precision")}
    if confusion is not None:
        size = len(confusion["labels"])
        mine = [[0] * size for _ in range(size)]
        for y, p in zip(observed["labels"], observed["predictions"]):
            mine[y][p] += 1
        verdict["confusion_cells_differ"] = sum(a != b for row, ref in zip(mine, confusion["matrix"])
                                                for a, b in zip(row, ref))
        verdict["agrees"] = verdict["agrees"] and verdict["confusion_cells_differ"] == 0
    return verdict


def caveats(config: dict, recorded: dict, data_size: int) -> list[str]:
    """What can legitimately move a few images between the recorded evaluation and the pipeline's."""
    notes = []
    if recorded.get("mixed_precision") in ("bf16", "fp16"):
        notes.append(f"the recorded metrics were computed under {recorded['mixed_precision']} autocast "
                     "(train with --mixed-precision no for an fp32 evaluation)")
    size = config["pretrained_cfg"]["input_size"][-1]
    if size != data_size:
        notes.append(f"the model resizes the {data_size} px images to {size} px: cifar-tl resamples on the device, "
                     "the pipeline with PIL")
    return notes


def crosscheck(model: str, folder: Path, bundle: DatasetBundle, split: str, *, batch_size: int,
               device: str) -> dict:
    """Run the pipeline over `split`, compare with what the folder records; the result and a message."""
    config = json.loads((folder / "config.json").read_text())
    check_architecture(config)
    observed = pipeline_accuracy(folder, getattr(bundle, split), bundle.fine_names, batch_size=batch_size,
                                 device=device)
    recorded = recorded_metrics(folder, config)
    path = folder / "confusion.json"
    confusion = json.loads(path.read_text()) if path.is_file() else None
    if confusion is not None and confusion["labels"] != bundle.fine_names:
        confusion = None  # another class order: the counts still compare
    verdict = compare(observed, recorded, bundle.fingerprint, split, confusion)
    result = {"model": model, "split": split, "dataset_fingerprint": bundle.fingerprint,
              **{k: v for k, v in observed.items() if k not in ("predictions", "labels")}, **verdict}
    if verdict["agrees"] is False:
        result["caveats"] = caveats(config, recorded, bundle.image_size)
    result["message"] = message(result)
    return result


def message(result: dict) -> str:
    seen = (f"transformers pipeline + evaluate: {result['correct']}/{result['n']} correct "
            f"({100 * result['top1']:.2f} %) on the {result['split']} split")
    if result["agrees"] is None:
        return f"{seen}; {result['reason']}"
    recorded = (f"the recorded {100 * result['recorded_top1']:.2f} % ({result['recorded_correct']}/{result['n']} "
                "correct)")
    cells = result.get("confusion_cells_differ")
    matrix = "" if cells is None else f" and with confusion.json ({cells} of its cells differ)"
    if result["agrees"]:
        return f"{seen}: agrees with {recorded} to the last image{matrix}"
    why = f"; possible causes: {'; '.join(result['caveats'])}" if result["caveats"] else ""
    return f"{seen}: DISAGREES with {recorded} ({result['difference']:+d} correct images){matrix}{why}"
