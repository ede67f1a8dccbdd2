"""CUDA graphs for the training step's forward and backward.

A CIFAR-size step on a GPU is bound by the host, not the GPU: EfficientNet-B0 launches ~1,500 kernels per
step, each costing the Python/launch overhead, while the GPU finishes its work in a few milliseconds. A CUDA
graph records those launches once and replays them with one call, so the step runs at the GPU's speed.
`torch.cuda.make_graphed_callables` graphs the model's training forward and its backward; eval mode still
runs the ordinary forward (so validation batches may have any size).

Graphs have fixed shapes. A run whose training size changes (progressive resizing) captures one graph per size
(`capture_shapes`): the model's forward then picks the graph by the input's shape, and runs eagerly for any
other shape and in eval mode.

A process that forks after a capture (DataLoader workers) must free unused graphed models first
(`gc.collect()`): a forked child whose garbage collector frees CUDA graphs dies of a CUDA error.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def graph_blockers(*, num_processes: int, compile: bool, grad_accum_steps: int, frozen_parts: bool) -> list[str]:
    """Why a GPU training step cannot be graphed with these settings (empty: it can)."""
    reasons = []
    if num_processes > 1:
        reasons.append("several processes (DDP's gradient hooks)")
    if compile:
        reasons.append("--compile")
    if grad_accum_steps > 1:
        reasons.append("--grad-accum-steps > 1 (replays overwrite the accumulated gradients)")
    if frozen_parts:
        reasons.append("frozen parts or BatchNorm in eval mode change between epochs")
    return reasons


def capture(model: torch.nn.Module, batch: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> None:
    """Graph `model`'s training forward + backward in place, for inputs shaped like `batch` (the step's
    input then has to keep that shape: drop the last partial batch). The warm-up and capture passes run
    on `batch` without touching weights or gradients; BatchNorm statistics are put back as they were.
    `autocast_dtype`: capture under autocast (the model's forward must not enter autocast itself).
    A failed capture (an op CUDA graphs cannot record) raises and leaves the model's forward as it was."""
    saved = [b.detach().clone() for b in model.buffers()]
    # the capture's side stream leaves the weights' gradient nodes tagged with it; the warning this causes on
    # every later backward (recent torch) is about a possible extra sync, not about correctness
    if hasattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch"):
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    amp = (torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False) if autocast_dtype
           else nullcontext())
    try:
        with amp:
            torch.cuda.make_graphed_callables(model, (batch.detach().clone(),), allow_unused_input=True)
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


def capture_shapes(model: torch.nn.Module, batches: list[torch.Tensor],
                   autocast_dtype: torch.dtype | None = None) -> None:
    """`capture` once per input shape (each graph keeps its own memory pool), then dispatch: in training mode a
    batch of a captured shape replays its graph, anything else runs the forward the model had before (which may
    be Accelerate's autocast wrapper). A failed capture raises and leaves that forward in place."""
    original = model.forward
    graphed: dict[tuple[int, ...], object] = {}
    try:
        for batch in batches:
            capture(model, batch, autocast_dtype)
            graphed[tuple(batch.shape)] = model.forward  # make_graphed_callables' forward for this shape
            model.forward = original  # the next capture records the plain forward again
    except BaseException:
        model.forward = original
        raise
    if len(graphed) == 1:
        model.forward = next(iter(graphed.values()))
        return

    def forward(*args, **kwargs):
        step = graphed.get(tuple(args[0].shape)) if model.training and args else None
        return (step or original)(*args, **kwargs)

    model.forward = forward
