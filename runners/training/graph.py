"""A training step replayed as one CUDA graph (runtime.cuda_graph, issue 19).

A small model's step is hundreds of kernels of a few microseconds each, so the CPU that launches them, not the
GPU, sets its pace: a d64 pack of 4 stepped in 9 ms on an H200, one model alone in 6 ms (results/benchmarks.jsonl). Captured once, the
whole step (forward, backward, clip, the optimizer's update) is one launch.

The first WARMUP steps run as usual, on a side stream (what capture needs: autograd's and the allocator's
first-use work, and torch.compile's, done before it); the next is captured and replayed, and every later step
copies its batch and learning rates into the graph's inputs and replays it. Every step is a real one, so the
numbers are the same steps' as without the graph. What the step keeps between calls (parameters, optimizer
state, its step count, which members are active) lives in tensors that it updates in place, and those are what
the graph reads and writes on every replay; the gradients are the graph's own buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from runners.training.step import Batch

Step = Callable[[list[Batch], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]

WARMUP = 3  # steps before the capture: torch's docs ask for a few on a side stream


class GraphedStep:
    """`step(micro_batches, lr)` (gradients None on entry, left set) run eagerly WARMUP times, then as one graph."""

    def __init__(self, step: Step, clear_grads: Callable[[], None], device: torch.device):
        self.step, self.clear_grads, self.device = step, clear_grads, device
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Batch] = []
        self.lr = torch.empty(0)
        self.outputs: tuple[torch.Tensor, dict[str, torch.Tensor]] = (torch.empty(0), {})
        self.stream = torch.cuda.Stream(device)

    def __call__(self, micro_batches: list[Batch], lr: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.calls += 1
        # contiguous from the first call on: the capture's inputs must look to torch.compile's guards (strides
        # included) as the warm-up's did, or it would compile again inside the capture
        micro_batches = [(x.contiguous(), y.contiguous()) for x, y in micro_batches]
        if self.calls <= WARMUP:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                out = self.step(micro_batches, lr)
                self.clear_grads()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            return out
        if self.graph is None:
            self._capture(micro_batches, lr)
        else:
            for (x, y), (static_x, static_y) in zip(micro_batches, self.inputs, strict=True):
                static_x.copy_(x, non_blocking=True)
                static_y.copy_(y, non_blocking=True)
            self.lr.copy_(lr, non_blocking=True)
        self.graph.replay()
        losses, router = self.outputs  # the graph's buffers, rewritten by the next replay: copies go out
        return losses.clone(), {key: value.clone() for key, value in router.items()}

    def _capture(self, micro_batches: list[Batch], lr: torch.Tensor) -> None:
        """Record this step's kernels with its own batch and lr as the graph's inputs (nothing runs yet)."""
        self.inputs = [(x.clone(), y.clone()) for x, y in micro_batches]
        self.lr = lr.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.step(self.inputs, self.lr)
