"""airbench's lookahead (Jordan, 2024; from hlb-cifar10): every few steps the weights are pulled to a moving
average of themselves, and the average tightens as training ends. Early on it barely acts (fast progress);
near the end it averages strongly, which is what short runs otherwise lack."""
from __future__ import annotations

import torch


class Lookahead:
    def __init__(self, model: torch.nn.Module, every: int = 5, start: float = 0.3, decay: float = 0.95,
                 power: float = 3.0):
        self.model, self.every, self.start, self.power = model, every, start, power
        self.base = decay ** every  # the per-step decay, compounded over the update interval
        self.average: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, step: int, progress: float) -> None:
        """Call after each optimizer step; `progress` in [0, 1] is the share of the run done."""
        if progress < self.start or step % self.every:
            return
        state = self.model.state_dict()  # weights and BatchNorm statistics alike
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
            return
        rho = self.base * min(progress, 1.0) ** self.power
        for key, avg in self.average.items():
            avg.lerp_(state[key], 1 - rho)
            state[key].copy_(avg)

    @torch.no_grad()
    def finish_epoch(self) -> None:
        """End of an epoch: the model takes the average, so validation and checkpoints see it."""
        if self.average is not None:
            state = self.model.state_dict()
            for key, avg in self.average.items():
                state[key].copy_(avg)
