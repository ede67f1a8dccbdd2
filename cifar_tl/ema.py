"""An exponential moving average (EMA) of the weights, the transfer practitioner's free accuracy: the model
trains on its own weights, and validation, the best checkpoint, the test evaluation and the exported model use
the average (timm's `ModelEmaV3`, Polyak averaging).

The average covers every floating-point entry of the state dict (weights and BatchNorm statistics alike, as
timm's EMA does) and is kept in fp32 on the model's device; integer entries (BatchNorm's batch counter) are
copied. Its decay warms up as `min(decay, (1 + t) / (10 + t))` (TensorFlow's `num_updates` rule): a short
fine-tune of a few thousand steps averages over its last ~10 % of steps instead of over its random start.
`state_dict` / `load_state_dict` make it a checkpointed object (`Checkpoints(objects=...)`), so a resumed run
continues the same average.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class ModelEma:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1); got {decay}")
        self.model, self.decay, self.updates = model, decay, 0
        state = model.state_dict()
        self.average = {k: v.detach().float().clone() for k, v in state.items() if v.is_floating_point()}
        # the model's own tensors, looked up once: its weights change in place (optimisers, load_state_dict, CUDA
        # graphs depend on it), and a state_dict() per step would cost ~1 ms of Python on a 300-tensor network
        self._live = [state[k] for k in self.average]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimiser step: average <- decay * average + (1 - decay) * weights."""
        weight = 1.0 - self.current_decay()
        current = [t if t.dtype == torch.float32 else t.float() for t in self._live]
        torch._foreach_lerp_(list(self.average.values()), current, weight)
        self.updates += 1

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged entries (in the model's own dtypes): what is saved as the
        best weights and exported."""
        state = self.model.state_dict()
        return {k: (self.average[k].to(v.dtype) if k in self.average else v).detach() for k, v in state.items()}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model, in place (so CUDA graphs and optimiser keep their tensors), for the
        duration of the block; the training weights afterwards."""
        with torch.no_grad():
            saved = [t.detach().clone() for t in self._live]
            for live, avg in zip(self._live, self.average.values()):
                live.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for live, value in zip(self._live, saved):
                    live.copy_(value)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "average": self.average}

    @torch.no_grad()
    def load_state_dict(self, saved: dict) -> None:
        if set(saved["average"]) != set(self.average):
            raise ValueError("the checkpoint's weight average belongs to another model")
        self.updates, self.decay = int(saved["updates"]), float(saved["decay"])
        for k, value in saved["average"].items():
            self.average[k].copy_(value)
