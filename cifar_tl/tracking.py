"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard): the run's config at the start, metrics
per epoch (the engine logs them with `accelerator.log`), and with W&B the model weights as versioned artifacts."""
from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from .config import TrainConfig


def trackers(cfg: TrainConfig) -> list[str] | None:
    """Accelerate's `log_with` for `--report-to`."""
    if cfg.report_to == "none":
        return None
    return ["wandb", "tensorboard"] if cfg.report_to == "all" else [cfg.report_to]


def start(accelerator: Accelerator, cfg: TrainConfig, out: Path) -> None:
    if cfg.report_to != "none":
        accelerator.init_trackers(cfg.project_name, config=cfg.to_dict(),
                                  init_kwargs={"wandb": {"dir": str(out), "name": out.name}})


def log_model_artifact(accelerator: Accelerator, cfg: TrainConfig, weights: Path | None, record: dict) -> None:
    """With wandb, version the best weights as a model artifact carrying the epoch's metrics (as the
    reference study's run did)."""
    if weights is None or cfg.report_to not in ("wandb", "all") or not accelerator.is_main_process:
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=record)
    artifact.add_file(str(weights), name="model.safetensors")
    run.log_artifact(artifact, aliases=[f"epoch_{record['epoch']}", "best"])
