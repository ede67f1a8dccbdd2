"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard): the run's config (with the dataset
fingerprint) at the start, metrics per epoch (the engine logs them with `accelerator.log`, step = epoch), and with
W&B, as the reference study's run recorded itself:

* model artifacts `model-<run id>` (`--wandb-log-model`): `all` logs every epoch's weights (the study's
  `model-CNN1`, one version per epoch), `best` each improving epoch's, `end` the restored best weights once after
  training, `none` nothing. Aliases `epoch_N`, `latest` and `best` (an improving epoch); metadata: the epoch's
  `loss`, `accuracy`, `val_loss`, `val_accuracy` (the Keras names), `lr`, `history_step`, the run config and
  the dataset fingerprint;
* at the end of the run, one step after the last epoch: the test metrics, the loss and accuracy curves, the test
  confusion matrix, a table of test images with true and predicted fine / coarse labels (the study's "true vs
  predicted" figure) and the report's plots, as W&B media.

`finish` ends the trackers and waits for W&B's service process to write the run file (`wandb.teardown`):
`run.finish()` returns before an offline run's file is complete."""
from __future__ import annotations

import secrets
import string
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from .config import TrainConfig
from .files import read_jsonl

TABLE_IMAGES = 100  # test images in the end-of-run predictions table
MAX_CONFUSION_CLASSES = 100  # W&B's confusion matrix holds one row per (true, predicted) pair
KERAS_NAMES = {"train_loss": "loss", "train_top1": "accuracy", "val_loss": "val_loss", "val_top1": "val_accuracy"}


def trackers(cfg: TrainConfig) -> list[str] | None:
    """Accelerate's `log_with` for `--report-to`."""
    if cfg.report_to == "none":
        return None
    return ["wandb", "tensorboard"] if cfg.report_to == "all" else [cfg.report_to]


def start(accelerator: Accelerator, cfg: TrainConfig, out: Path, fingerprint: str | None = None,
          resumed: list[dict] = ()) -> None:
    """Start the trackers. A resumed run continues its W&B run (the id kept in OUT/wandb_run_id) and logs again
    the epochs of history.jsonl it lacks: a run killed with kill -9 loses what W&B had not yet written (offline,
    the whole run file), and without this the resumed run began at the checkpoint's epoch."""
    if cfg.report_to == "none":
        return
    wandb_kwargs = {"dir": str(out), "name": out.name}
    if "wandb" in trackers(cfg) and accelerator.is_main_process:
        wandb_kwargs.update(id=_wandb_id(out, cfg.resume), resume="allow")
    accelerator.init_trackers(cfg.project_name, config={**cfg.to_dict(), "dataset_fingerprint": fingerprint},
                              init_kwargs={"wandb": wandb_kwargs})
    run = wandb_run(accelerator)
    if run is not None and resumed:
        logged = run.summary.get("train/epoch") or 0  # an online run resumed: what the W&B server kept
        for record in resumed:
            if record["epoch"] > logged:
                run.log({f"train/{k}": v for k, v in record.items()}, step=record["epoch"])


def _wandb_id(out: Path, resume: bool) -> str:
    """The W&B run id of the run in `out`: the one it started with when resumed, else a new one (kept there)."""
    from .files import atomic_write_text

    path = out / "wandb_run_id"
    kept = path.read_text().strip() if resume and path.is_file() else ""
    if kept:
        return kept
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's own form
    atomic_write_text(path, run_id + "\n")
    return run_id


def wandb_run(accelerator: Accelerator):
    """The W&B run of this process, or None (no W&B tracker, or not the main process)."""
    if not accelerator.is_main_process or not any(t.name == "wandb" for t in accelerator.trackers):
        return None
    return accelerator.get_tracker("wandb", unwrap=True)


def logs_epoch(mode: str, improved: bool) -> bool:
    """Whether `--wandb-log-model mode` logs an epoch's weights as an artifact version."""
    return mode == "all" or (mode == "best" and improved)


def log_epoch(accelerator: Accelerator, cfg: TrainConfig, model: torch.nn.Module | dict, record: dict,
              improved: bool) -> None:
    """After an epoch: its weights (the model, or a state dict such as the weight average) as a model artifact
    version, when `--wandb-log-model` asks for it."""
    run = wandb_run(accelerator)
    if run is None or not logs_epoch(cfg.wandb_log_model, improved):
        return
    from .model_folder import save_weights

    with tempfile.TemporaryDirectory(dir=cfg.output_dir) as tmp:  # W&B copies the file into its staging area
        weights = Path(tmp) / "model.safetensors"
        save_weights(model, weights)
        log_model_artifact(run, weights, record, ["latest", *(["best"] if improved else [])])


def log_model_artifact(run, weights: Path, record: dict, aliases: list[str]) -> None:
    """One version of `model-<run id>`: the weights file, the epoch's metrics under the study's (Keras) names,
    the run config and the dataset fingerprint as metadata."""
    import wandb

    config = dict(run.config)
    metadata = {KERAS_NAMES.get(k, k): v for k, v in record.items() if k in (*KERAS_NAMES, "epoch", "lr")}
    metadata.update(history_step=record["epoch"], run_config=config,
                    dataset_fingerprint=config.get("dataset_fingerprint"))
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
    artifact.add_file(str(weights), name="model.safetensors")
    run.log_artifact(artifact, aliases=[f"epoch_{record['epoch']}", *aliases])


def log_end_of_run(accelerator: Accelerator, cfg: TrainConfig, out: Path, metrics: dict, test, names: tuple,
                   logits: torch.Tensor) -> None:
    """The test metrics on every tracker, one step after the last epoch; with W&B also the media and, with
    `--wandb-log-model end`, the restored best weights. `test` is the test `Split`, `names` = (fine names,
    coarse names or None, fine_to_coarse or None), `logits` the test logits in the split's order."""
    history = read_jsonl(out / "history.jsonl")
    step = max([h["epoch"] for h in history], default=0) + 1
    accelerator.log({f"test/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    run = wandb_run(accelerator)
    if run is None:
        return
    if cfg.wandb_log_model == "end" and history:
        best = next((h for h in history if h["epoch"] == metrics.get("best_epoch")), history[-1])
        log_model_artifact(run, out / "model" / "model.safetensors", best, ["latest", "best"])
    run.log(_media(out, history, test, names, logits), step=step)


def _media(out: Path, history: list[dict], test, names: tuple, logits: torch.Tensor) -> dict:
    import wandb

    fine_names = names[0]
    epochs = [h["epoch"] for h in history]
    splits = ("train", "val") if all("val_loss" in h for h in history) else ("train",)  # no validation split
    media = {f"curves/{name}": wandb.plot.line_series(
        xs=epochs, ys=[[h[f"{split}_{key}"] for h in history] for split in splits],
        keys=[KERAS_NAMES[f"{split}_{key}"] for split in splits], title=name.capitalize(), xname="epoch")
        for name, key in (("loss", "loss"), ("accuracy", "top1"))} if history else {}
    pred = logits.argmax(-1)
    if len(fine_names) <= MAX_CONFUSION_CLASSES:
        media["test/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=test.fine.tolist(), preds=pred.tolist(), class_names=list(fine_names), title="Test confusion")
    media["test/predictions"] = _predictions_table(test, names, logits.float().softmax(-1))
    for png in sorted((out / "plots").glob("*.png")):  # every plot of the report (calibration included)
        media[f"plots/{png.stem}"] = wandb.Image(str(png))
    return media


def _predictions_table(test, names: tuple, probs: torch.Tensor):
    """The first TABLE_IMAGES test images with true and predicted fine (and coarse) labels."""
    import wandb

    from .data import coarse_probs

    fine_names, coarse_names, fine_to_coarse = names
    n = min(TABLE_IMAGES, len(probs))
    confidence, pred = probs[:n].max(-1)
    columns = ["index", "image", "true_fine", "pred_fine"]
    if coarse_names is not None:
        columns += ["true_coarse", "pred_coarse"]
        pred_coarse = coarse_probs(probs[:n], fine_to_coarse, len(coarse_names)).argmax(-1)
    table = wandb.Table(columns=[*columns, "confidence", "correct"])
    for i in range(n):
        true, guess = fine_names[int(test.fine[i])], fine_names[int(pred[i])]
        row = [i, wandb.Image(test.images[i].permute(1, 2, 0).cpu().numpy(), caption=f"{true} -> {guess}"),
               true, guess]
        if coarse_names is not None:
            row += [coarse_names[int(test.coarse[i])], coarse_names[int(pred_coarse[i])]]
        table.add_data(*row, float(confidence[i]), bool(pred[i] == test.fine[i]))
    return table


def finish(accelerator: Accelerator) -> None:
    """End the trackers (also tears down the process group: nothing collective after this). With W&B, wait for
    its service process: the offline run file is complete when this returns."""
    used_wandb = wandb_run(accelerator) is not None
    accelerator.end_training()
    if used_wandb:
        import wandb

        wandb.teardown()
