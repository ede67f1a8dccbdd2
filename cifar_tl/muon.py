"""Muon for the convolution filters, Nesterov SGD for everything else, in one optimizer (airbench94_muon,
Jordan 2024: 94 % CIFAR-10 in 8 epochs where plain SGD needs 10).

Muon takes the (Nesterov) momentum of a filter's gradient, reshaped to [out, in*k*k], and replaces it by its
nearest semi-orthogonal matrix (a few Newton-Schulz iterations, no SVD): every direction of the update gets
the same size, so the rarely-excited ones learn as fast as the dominant ones. The filter itself is rescaled
to a fixed norm (sqrt(out)) before each step, which stands in for weight decay. The update does not depend
on the gradient's scale, so Muon's learning rate is the same for a mean or a summed loss and for any batch.

One optimizer (param groups with `muon=True` or not) keeps the engine's single `optimizer.step()`,
LambdaLR schedule, checkpointing and Accelerate wrapping unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

# quintic iteration coefficients chosen for the steepest slope at zero (Jordan): 3 steps leave the singular
# values spread over ~[0.5, 1.5] instead of exactly 1, which trains as well as the exact polar factor
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation of a 2-D matrix: U S' V^T with S' ~ 1 for G = U S V^T (fp32)."""
    if g.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.float() / (g.norm() + eps)  # top singular value <= 1: inside the iteration's basin
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Groups with `muon=True` (>= 2-D weights): Muon with Nesterov momentum and per-step weight
    normalisation. Other groups: Nesterov SGD with coupled weight decay, as `torch.optim.SGD`."""

    def __init__(self, params, lr: float = 0.24, momentum: float = 0.6, weight_decay: float = 0.0,
                 ns_steps: int = 3, normalize_weights: bool = True):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, muon=False, ns_steps=ns_steps,
                        normalize_weights=normalize_weights)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices or filters (ndim >= 2), not biases or norms")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd and not group["muon"]:
                    g = g.add(p, alpha=wd)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(beta).add_(g)
                update = g.add(buf, alpha=beta)  # Nesterov
                if group["muon"]:
                    if group["normalize_weights"]:
                        p.mul_(p.shape[0] ** 0.5 / (p.norm() + 1e-12))
                    update = newton_schulz(update.reshape(len(update), -1), group["ns_steps"]).view_as(p)
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss


def param_groups(model: nn.Module, *, muon_lr: float, muon_momentum: float, lr: float, bias_lr: float,
                 momentum: float, weight_decay: float) -> list[dict]:
    """airbench94_muon's split: trainable conv filters (4-D) -> Muon; biases and norm parameters (1-D) ->
    SGD at `bias_lr`; the rest (the classifier) -> SGD at `lr`. Both SGD groups decay their weights by the
    same share per step (`lr * weight_decay`), as airbench sets each group's weight decay to wd / lr."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trainable if p.ndim == 4]
    biases = [p for p in trainable if p.ndim <= 1]
    others = [p for p in trainable if p.ndim in (2, 3)]
    groups = [dict(params=filters, lr=muon_lr, momentum=muon_momentum, muon=True),
              dict(params=biases, lr=bias_lr, momentum=momentum, weight_decay=weight_decay * lr / bias_lr),
              dict(params=others, lr=lr, momentum=momentum, weight_decay=weight_decay)]
    return [g for g in groups if g["params"]]
