"""The model card (README.md of a model folder), rendered from the repository's `model_card.md` Jinja2
template, the folder's config.json and the run's outputs; `model_folder.write_card` writes it. The YAML
metadata is built with huggingface_hub's `ModelCardData` and `EvalResult`, so the `model-index` is well formed
by construction, and the rendered card is parsed back with `ModelCard` before it is written."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"  # ./model_card.md links here
LICENSE = "apache-2.0"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_SUPERCLASSES = {  # the published CIFAR-100 classes; label ids are the alphabetical order of each list
    "aquatic_mammals": "beaver dolphin otter seal whale", "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip", "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach", "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk", "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman", "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train", "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
CIFAR100_FINE = sorted(f for fines in CIFAR100_SUPERCLASSES.values() for f in fines.split())
CIFAR100_COARSE = sorted(CIFAR100_SUPERCLASSES)
CIFAR100_FINE_TO_COARSE = [next(i for i, c in enumerate(CIFAR100_COARSE) if f in CIFAR100_SUPERCLASSES[c].split())
                           for f in CIFAR100_FINE]
CIFAR_SIZES = "(Krizhevsky, 2009): 50,000 training and 10,000 test colour images of 32×32 pixels"
HUB_DATASETS = "https://huggingface.co/datasets"
DATASETS = {  # Hub id -> (name, description)
    "uoft-cs/cifar100": ("CIFAR-100", (f"[CIFAR-100]({HUB_DATASETS}/uoft-cs/cifar100) {CIFAR_SIZES}, 100 "
                                       "classes of 500 training and 100 test images each, in 20 "
                                       "superclasses.")),
    "uoft-cs/cifar10": ("CIFAR-10", (f"[CIFAR-10]({HUB_DATASETS}/uoft-cs/cifar10) {CIFAR_SIZES}, 10 classes "
                                     "of 5,000 training and 1,000 test images each.")),
}
# What a local copy must match to be named as the Hub dataset: split sizes, class lists (and superclasses)
PUBLISHED = {"uoft-cs/cifar100": ({"train": 50_000, "test": 10_000}, CIFAR100_FINE, CIFAR100_COARSE,
                                  CIFAR100_FINE_TO_COARSE),
             "uoft-cs/cifar10": ({"train": 50_000, "test": 10_000}, CIFAR10_NAMES, None, None)}
SOURCE_KINDS = {"parquet": "a local folder of parquet files", "save-to-disk": "a local `save_to_disk` folder",
                "cifar-pickle": "a local cifar-100-python folder", "cifar-tar": "a local cifar-100-python archive",
                "imagefolder": "a local image folder"}
# Run settings that say where and how a run was logged, not how the model was trained.
NOT_HYPERPARAMETERS = {"output_dir", "overwrite_output_dir", "resume", "report_to", "wandb_log_model",
                       "project_name", "push_to_hub", "hub_model_id", "hub_private", "data_cache", "eval_batch_size",
                       "image_column", "label_column", "coarse_label_column", "train_split", "test_split", "dataset"}
METRICS = (("top1", "accuracy", "Top-1 accuracy"), ("top5", "top_5_accuracy", "Top-5 accuracy"),
           ("coarse_top1", "superclass_accuracy", "Superclass top-1 accuracy"))
CITATIONS = {
    "cifar": """@techreport{krizhevsky2009learning,
  title       = {Learning Multiple Layers of Features from Tiny Images},
  author      = {Krizhevsky, Alex},
  institution = {University of Toronto},
  year        = {2009}
}""",
    "efficientnet": """@inproceedings{tan2019efficientnet,
  title     = {EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks},
  author    = {Tan, Mingxing and Le, Quoc V.},
  booktitle = {Proceedings of the 36th International Conference on Machine Learning},
  pages     = {6105--6114},
  year      = {2019}
}""",
    "timm": """@misc{rw2019timm,
  author    = {Wightman, Ross},
  title     = {PyTorch Image Models},
  year      = {2019},
  publisher = {GitHub},
  url       = {https://github.com/huggingface/pytorch-image-models}
}""",
}


def render_card(config: dict, *, model_dir: Path, repo_id: str | None = None,
                run_dir: Path | None = None, location: Path | None = None) -> ModelCard:
    """The card of the folder `model_dir` (read for its weights and plots); without `repo_id` the loading
    snippets name the folder by `location` (default: `model_dir`)."""
    extra = config.get("cifar_tl", {})
    train, metrics = extra.get("train_config") or {}, extra.get("metrics") or {}
    architecture, names = config["architecture"], config["label_names"]
    coarse_names = extra.get("coarse_names")
    is_timm = extra.get("library_name", "timm") == "timm"  # export records which library builds it
    dataset = data_context(extra, train, names)
    dataset_id, dataset_name = dataset["dataset_id"], dataset["dataset_name"]
    base_model = extra.get("base_model")
    title = repo_id.split("/")[-1] if repo_id else f"{architecture} on {dataset_name}"
    pct = {k: f"{percent(metrics[k]):.2f} %" for k in ("top1", "coarse_top1") if k in metrics}
    data = ModelCardData(
        license=LICENSE,
        library_name="timm" if is_timm else "pytorch",
        tags=["image-classification", *(["timm", "transformers"] if is_timm else ["pytorch"]), "safetensors",
              "cifar-tl", *([dataset_id.split("/")[-1]] if dataset_id else []),
              *(["transfer-learning"] if base_model or extra.get("weights_source") else [])],
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"],
        base_model=base_model,
        pipeline_tag="image-classification",
        model_name=title,
        # results on a named Hub dataset only: a local folder's name ("cifar100", "mnist") reads as a Hub id there
        eval_results=_eval_results(metrics, dataset_id, dataset_name, train.get("label_column")) or None
        if dataset_id else None,
    )
    cfg = config["pretrained_cfg"]
    folder = location or model_dir
    location = repo_id or str(folder)
    context = dict(
        title=title, architecture=architecture, is_timm=is_timm,
        origin=_origin(train, base_model, extra.get("weights_source")),
        num_classes=len(names), num_coarse=len(coarse_names) if coarse_names else 0,
        params=_parameters(extra.get("parameters"), model_dir / "model.safetensors"),
        data_size=extra.get("data_size") or cfg["input_size"][-1], image_size=cfg["input_size"][-1],
        interpolation=cfg["interpolation"], mean=_floats(cfg["mean"]), std=_floats(cfg["std"]),
        **dataset, train=train,
        summary=_summary(metrics), hyperparameters=_hyperparameters(train),
        results=_results(metrics), test_images=f"{metrics['n']:,}" if "n" in metrics else None,
        top1=pct.get("top1"), coarse_top1=pct.get("coarse_top1"), within_superclass=_within_superclass(metrics),
        weakest=_weakest_superclasses(run_dir), plots=_plots(model_dir),
        model_id=location, timm_id=f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder}",
        citations=[CITATIONS[k] for k, used in (("cifar", dataset_id in DATASETS),
                                                ("efficientnet", "efficientnet" in architecture),
                                                ("timm", is_timm)) if used],
    )
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.from_string(TEMPLATE.read_text()).render(card_data=data.to_yaml(), **context)
    return ModelCard(text)  # parses YAML and model-index back: malformed metadata fails here, not on the Hub


def data_context(extra: dict, train: dict, names: list[str]) -> dict:
    """What the card says about the data: `dataset_id` (the Hub dataset named in the metadata, or None),
    `dataset_name`, `dataset_description` (the dataset), `data_used` (what this run used: source, split sizes,
    subset or not, fingerprint) and `is_cifar`."""
    data = extra.get("data") or _format1_data(extra, train)
    dataset_id = _dataset_id(data, names, extra.get("coarse_names"), extra.get("fine_to_coarse"))
    source = data.get("source")
    name = DATASETS.get(dataset_id, (dataset_id or (Path(source).name if source else "its dataset"),))[0]
    coarse = extra.get("coarse_names")
    classes = f"{len(names)} classes" + (f" in {len(coarse)} superclasses" if coarse else "")
    if dataset_id in DATASETS:
        description = DATASETS[dataset_id][1]
    elif dataset_id:
        description = f"[{dataset_id}]({HUB_DATASETS}/{dataset_id}) on the Hugging Face Hub: {classes}."
    else:
        description = f"{f'`{source}`' if source else 'Its dataset'}: {classes}."
    return {"dataset_id": dataset_id, "dataset_name": name, "dataset_description": description,
            "data_used": _data_used(data, dataset_id, name, train) if source else None,
            "is_cifar": dataset_id in DATASETS}


def _format1_data(extra: dict, train: dict) -> dict:
    """Folders written before format 2 recorded only the configured source: a Hub run if it names a Hub dataset
    we know, otherwise unidentified; the split sizes are unknown."""
    source = train.get("dataset")
    return {"source": source, "kind": "hub" if source in DATASETS else None,
            "fingerprint": extra.get("dataset_fingerprint")}


def _dataset_id(data: dict, names: list[str], coarse_names: list[str] | None,
                fine_to_coarse: list[int] | None) -> str | None:
    """The Hub dataset to name: the one the run read from the Hub, or a published dataset a local copy matches
    in split sizes, class lists and superclasses. Anything else (a fixture, another dataset) is not named."""
    if data.get("kind") == "hub":
        return data["source"]
    for hub_id, (sizes, fine, coarse, mapping) in PUBLISHED.items():
        if (data.get("source_sizes") == sizes and names == fine and coarse_names == coarse
                and (mapping is None or fine_to_coarse == mapping)):
            return hub_id
    return None


def _data_used(data: dict, dataset_id: str | None, name: str, train: dict) -> str:
    """One paragraph on the data this run used, from the sizes recorded at training time."""
    source, kind = f"`{data['source']}`", data.get("kind")
    held = data.get("test_held_out")  # the source had no test split: part of its train split became the test
    used = data["train"] + data["val"] + (data["test"] if held else 0) if "train" in data else 0
    source_train = (data.get("source_sizes") or {}).get("train", used)
    subset = used < source_train
    what = "a subset of " if subset else ""
    if kind == "hub":
        what = f"This run read {what}{source} from the Hugging Face Hub"
    elif dataset_id:
        what = (f"This run read {what}a local copy of {name} ({SOURCE_KINDS.get(kind, 'local files')} {source}, "
                "with the published split sizes and class lists)")
    else:
        what = (f"This run read {SOURCE_KINDS.get(kind, 'the dataset')} {source}, not a dataset published on the "
                f"Hub{', and used a subset of it' if subset else ''}")
    fingerprint = f" Dataset fingerprint: `{data['fingerprint']}`." if data.get("fingerprint") else ""
    share = f"{100 * train.get('val_fraction', 0):g} %"
    if "train" not in data:  # format 1: the split sizes were not recorded
        sample = (f", took a stratified subsample of {train['max_train_samples']:,} training images"
                  if train.get("max_train_samples") else "")
        return (f"{what}{sample}, held out a stratified {share} of the training split for validation and "
                f"early stopping, and reports results on the untouched test split.{fingerprint}")
    sample = f" (a stratified subsample: `--max-train-samples {train.get('max_train_samples')}`)" if subset else ""
    pool = source_train - data["test"] if held else source_train
    val = (f"{data['val']:,} validation images (a stratified {share} of its {pool:,} "
           "training images, for early stopping)" if data["val"] else "no validation images")
    test = (f" (the source has no test split: a stratified {100 * held:g} % of its {source_train:,} images, held "
            "out before training)" if held else "")
    return (f"{what}: {data['train']:,} training images{sample}, {val} and {data['test']:,} test images{test}, "
            f"on which the results below are reported.{fingerprint}")


def _origin(train: dict, base_model: str | None, weights_source: str | None = None) -> str:
    if not train:
        return "trained"
    if base_model:
        source = f"the ImageNet-1k weights [{base_model}](https://huggingface.co/{base_model})"
    elif weights_source:
        source = f"the ImageNet-1k weights of the package {weights_source}"
    elif train.get("weights"):
        source = f"the weights file `{Path(train['weights']).name}`"
    else:
        return "trained from random initialisation"
    if train.get("linear_probe") or train.get("freeze_backbone"):
        return f"trained as a linear classifier on the frozen features of {source}"
    return f"fine-tuned from {source}"


def percent(value: float) -> float:
    """A share in [0, 1] as a percentage rounded to 2 decimals (the number the model-index records)."""
    return round(100 * float(value), 2)


def _floats(values) -> str:
    return ", ".join(f"{v:.4f}" for v in values)


def _eval_results(metrics: dict, dataset_type: str, dataset_name: str, label_column: str | None = None
                  ) -> list[EvalResult]:
    """The model-index entries; a run on another label column than the dataset's default (CIFAR-100's
    `coarse_label`: 20 classes) says so in the dataset's name and args, or it would read as a fine-label result."""
    if label_column:
        dataset_name = f"{dataset_name} ({label_column})"
    return [EvalResult(task_type="image-classification", task_name="Image Classification",
                       dataset_type=dataset_type, dataset_name=dataset_name, dataset_split="test",
                       dataset_args={"label_column": label_column} if label_column else None,
                       metric_type=kind, metric_name=f"{name} (%)", metric_value=percent(metrics[key]))
            for key, kind, name in METRICS if key in metrics]


def _results(metrics: dict) -> list[tuple[str, str]]:
    rows = [(name, f"{percent(metrics[key]):.2f} %") for key, _, name in METRICS if key in metrics]
    if "top1" in metrics.get("tta", {}):
        views = ("6-view TTA (mirror + 1 px shifts)" if metrics["tta"].get("level", 1) >= 2
                 else "horizontal-flip TTA")
        rows.append((f"Top-1 accuracy with {views}", f"{percent(metrics['tta']['top1']):.2f} %"))
    rows += [(name, f"{metrics[key]:.4f}") for key, name in (("loss", "Cross-entropy loss"),
                                                              ("ece", "Expected calibration error (15 bins)"))
             if key in metrics]
    return rows


def _summary(metrics: dict) -> dict | None:
    if not {"best_epoch", "epochs_run", "stopped", "train_seconds"} <= metrics.keys():
        return None
    return {**{k: metrics[k] for k in ("best_epoch", "epochs_run", "stopped")},
            "train_minutes": f"{metrics['train_seconds'] / 60:.1f}"}


def _hyperparameters(train: dict) -> list[tuple[str, str]]:
    def show(value) -> str:
        return "–" if value is None else str(value)

    return [(k, show(v)) for k, v in train.items() if k not in NOT_HYPERPARAMETERS]


def _parameters(counts: dict | None, weights: Path) -> str:
    """Total / trainable / non-trainable as recorded at training time (counted as Keras does); folders written
    before format 2: the learned parameters from the safetensors header, BatchNorm statistics excluded."""
    if counts:
        if not counts["non_trainable"]:
            return f"{counts['total']:,} (all trainable)"
        return (f"{counts['total']:,}: {counts['trainable']:,} trainable, {counts['non_trainable']:,} "
                "non-trainable (BatchNorm moving statistics and frozen weights, counted as Keras counts them)")
    total = 0
    with safe_open(str(weights), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                total += math.prod(f.get_slice(key).get_shape())
    return f"{total / 1e6:.2f} M"


def _within_superclass(metrics: dict) -> str | None:
    """The share of fine-label mistakes whose superclass is still right, as the test's superclass and fine top-1
    imply it ("12 %"), or None without both, or when the superclass top-1 is the lower (a short run's
    near-uniform probabilities, summed per superclass, disagree with its own top fine class: no share follows)."""
    if "coarse_top1" not in metrics or "top1" not in metrics or metrics["top1"] >= 1:
        return None
    if metrics["coarse_top1"] < metrics["top1"]:  # summed probabilities of an unsure model: the share is not implied
        return None
    share = (metrics["coarse_top1"] - metrics["top1"]) / (1 - metrics["top1"])
    return f"{share:.0%}".replace("%", " %")


def _weakest_superclasses(run_dir: Path | None, count: int = 3) -> list[tuple[str, str]]:
    """The lowest per-superclass test accuracies, from the run's eval_details.json when the run is known."""
    path = run_dir / "eval_details.json" if run_dir else None
    details = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    per_super = details.get("plain", {}).get("per_superclass") or {}
    weakest = sorted(per_super.items(), key=lambda kv: kv[1])[:count]
    return [(name, f"{percent(acc):.1f} %") for name, acc in weakest]


def _plots(model_dir: Path) -> list[dict]:
    return [{"file": f"plots/{p.name}", "caption": p.stem.replace("_", " ").capitalize()}
            for p in sorted(model_dir.glob("plots/*.png"))]
