"""``gpuopt.graphed_step(opt)``: an optimizer step replayed from a CUDA graph, no Python in the way."""

from __future__ import annotations

import operator
import warnings

import torch

from ._fused import FusedOptimizer


class GraphedStep:
    """``step = gpuopt.graphed_step(opt)``; then ``step()`` where the loop called ``opt.step()``.

    The first call runs an eager ``opt.step()`` (it makes the states, validates, compiles the
    kernels) and then captures one more step in a CUDA graph without running it; every later call
    replays that graph: the GPU runs the same launches, the host pays one ``cudaGraphLaunch``.

    The graph holds addresses and values as they were at capture, so the rules are CUDA graphs':

    * gradients stay where they are: ``opt.zero_grad(set_to_none=False)`` (or a graphed
      backward that writes the same ``.grad`` tensors); parameters and states stay too;
    * hyperparameters are fixed at capture, except a learning rate given as a CUDA tensor
      (``lr=torch.tensor(1e-3, device="cuda")``), which the kernel reads at every replay —
      torch's LR schedulers update such a tensor in place;
    * no ``GradScaler`` (its ``found_inf`` is a new tensor every step): use bf16 autocast, which
      needs no scaling.

    ``check=True`` (default) makes each call compare what the graph was captured with — the
    parameters, their gradients' addresses, the optimizer state's generation, every group's
    options by identity — with what the optimizer holds now (the eager fast path's one cheap
    check, a pass over the tensors), and captures again, with a warning, when they
    differ. ``check=False`` skips it: zero host cost, and the rules above are the caller's to keep.
    """

    def __init__(self, optimizer: FusedOptimizer, *, check: bool = True):
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(f"graphed_step needs a gpuopt optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.check = check
        self.graph = None
        self.captures = 0
        self._key = None

    def __call__(self) -> None:
        opt = self.optimizer
        if opt._clip.value is not None:
            opt._clip.value = None
            raise RuntimeError("graphed_step: opt.clip_grad_norm_ hands the next step a new norm tensor, which a "
                               "graph cannot follow; clip in place with gpuopt.clip_grad_norm_(params, ...) "
                               "before the graphed step")
        if self.graph is not None and (not self.check or self._same(opt._graph_key())):
            self.graph.replay()
            return
        self._refuse_what_a_graph_cannot_hold()
        if self.graph is not None:
            warnings.warn("gpuopt.graphed_step: the optimizer changed since its step was captured (a gradient "
                          "or parameter moved, a state or option changed); capturing again. Keep gradients in "
                          "place (zero_grad(set_to_none=False)) and change the learning rate through a CUDA "
                          "tensor to replay without recapture.", stacklevel=2)
        opt.step()  # eager: states, validation, compiled kernels; this call's step
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt._step()  # captured, not run: the launches the fast path makes, nothing else
        self.graph, self._key = graph, opt._graph_key()
        self.captures += 1

    def _same(self, key) -> bool:
        # Addresses and counts by value; options by identity, against the objects held since
        # capture (so none of their ids can have been reused).
        values, objects = key
        return (values == self._key[0] and len(objects) == len(self._key[1])
                and all(map(operator.is_, objects, self._key[1])))

    def _refuse_what_a_graph_cannot_hold(self):
        opt = self.optimizer
        if getattr(opt, "_host_schedule", False):
            raise RuntimeError(f"graphed_step: {type(opt).__name__} works out each step's learning rate and averaging "
                               "weight on the host; a graph would replay the first step's. Use the eager opt.step()")
        devices = {p.device.type for group in opt.param_groups for p in group["params"]}
        if devices != {"cuda"}:
            raise RuntimeError(f"graphed_step: CUDA graphs need every parameter on a CUDA GPU (found {sorted(devices)})")
        if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
            raise RuntimeError("graphed_step: a GradScaler's grad_scale/found_inf are new tensors every step, which "
                               "a graph cannot follow; use bf16 autocast (no scaling) or the eager opt.step()")


def graphed_step(optimizer: FusedOptimizer, *, check: bool = True) -> GraphedStep:
    """See :class:`GraphedStep`."""
    return GraphedStep(optimizer, check=check)
