"""Which mixed precision a run trains in, and who chose it. In order: an explicit `--mixed-precision` (flag or
config file); Accelerate's own setting (`accelerate launch --mixed_precision`, `accelerate config`, or
`ACCELERATE_MIXED_PRECISION`); else `auto`: bf16 (fp16 without bf16) on a GPU, and on a CPU bf16 only where it
pays for the model (`models.cpu_bf16_pays`)."""
from __future__ import annotations

import os

import torch

from .models import cpu_bf16_pays

ACCELERATE_ENV = "ACCELERATE_MIXED_PRECISION"
LAUNCHED_ENV = "ACCELERATE_DYNAMO_BACKEND"  # `accelerate launch` sets it (with the precision) for its children


def mixed_precision(requested: str, model: str, cuda: bool | None = None) -> str:
    """Accelerate's `mixed_precision` for `requested`; `auto` follows the rule in the module docstring."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() if cuda is None else cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_pays(model) else "no"


def accelerate_choice() -> tuple[str, str] | None:
    """(precision, where it was set) when the user set Accelerate's precision, else None. `accelerate launch`
    always exports a precision; its default "no" (no flag, no `mixed_precision` in the config file) is not a
    choice."""
    value = os.environ.get(ACCELERATE_ENV)
    if not value:
        return None
    launched = LAUNCHED_ENV in os.environ
    if value != "no" or not launched:
        return value, ("accelerate launch (--mixed_precision or accelerate config)" if launched
                       else f"{ACCELERATE_ENV}={value}")
    if _config_file_precision() == "no":
        return "no", "accelerate config"
    return None


def _config_file_precision() -> str | None:
    try:
        from accelerate.commands.config import default_config_file, load_config_from_file

        if not os.path.isfile(default_config_file):
            return None
        return load_config_from_file(None).mixed_precision
    except Exception:  # an unreadable Accelerate config is Accelerate's to report, not ours
        return None


def choose(requested: str, explicit: bool, model: str, cuda: bool | None = None) -> tuple[str, str]:
    """(precision, where the choice came from) for a run."""
    if explicit:
        return mixed_precision(requested, model, cuda), f"--mixed-precision {requested}"
    chosen = accelerate_choice()
    if chosen is not None:
        return chosen
    return mixed_precision("auto", model, cuda), "auto"
