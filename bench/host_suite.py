"""Host cost of an eager step: what the CPU spends around the kernel launches, measured anywhere.

    python -m bench --suite host

Every Triton launch of gpuopt, and torch's fused optimizer kernels (``torch._fused_adamw_``,
``torch._fused_sgd_``), are replaced by no-ops; the rest of each ``opt.step()`` runs as a user
calls it on CPU tensors (validation, grouping, fingerprints, state lookups, torch's
``_foreach_add_`` of the step counters...). Median µs per step over 200 steps, the least of 5
such medians taken alternately with the reference (``interleaved``), gpuopt and torch
``fused=True`` side by side, for:

* ResNet-50's 161 parameter shapes and GPT-2-medium's 292 (each tensor capped at 2^16 elements:
  with launches stubbed the host cost depends on the number of tensors, not their size);
* gradients kept in place (``zero_grad(set_to_none=False)``) or at new addresses every step
  (``set_to_none=True`` may give them: here two gradient sets alternate);
* AdamW and SGD with momentum;
* the same AdamW steps on DTensor parameters and gradients, as FSDP2 makes them (``Shard(0)`` on
  a 1-rank gloo mesh, no other process): gpuopt updates the local shards; torch's fused step is
  stubbed at ``torch._fused_adamw_`` itself, before DTensor's dispatch, so its row leaves out the
  per-op DTensor cost torch pays on a real run (a lower bound for torch);
* ``gpuopt.nn.BatchNorm2d`` forward + backward per layer against an empty ``autograd.Function``
  with the same inputs (the floor any autograd op pays) and, for scale, against torch's own
  ``nn.BatchNorm2d`` (its CPU kernels run: host cost plus a little compute), all given a dense
  upstream gradient as a network's next layer gives one (until 2026-12-02 ``.sum().backward()``'s
  expanded gradient, which gpuopt copies to the input's layout and the empty function ignores).

Launches take the path they take on a GPU (``gpuopt._launch``: the cached launcher of the compiled kernel, found
by its specialisation key) down to the C launcher, which is stubbed: the ~3-5 µs the driver call
itself costs per launch on a GPU machine is not in these numbers (nor in torch's).
"""

from __future__ import annotations

import contextlib
import math
import platform
import statistics
import time

import torch

from .shapes import gpt2_medium_shapes, resnet50_shapes

CAP = 1 << 16


class _NoCompiledKernel:
    """Stands in for Triton's CompiledKernel: ``compiled[grid](*arguments)`` does nothing."""

    function = None

    def __getitem__(self, grid):
        return lambda *args: None


class _NoLaunch:
    """Stands in for a ``@triton.jit`` function with the real one's argument names: a launch
    does nothing, and hands ``gpuopt._launch`` a compiled kernel to keep, so the host path is
    the one a GPU runs (the cached launcher and its specialisation key), minus the C launch."""

    def __init__(self, kernel):
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def run(self, *args, grid, warmup, **kwargs):
        return _NoCompiledKernel()

    def warmup(self, *args, grid, **kwargs):
        return _NoCompiledKernel()


@contextlib.contextmanager
def stubbed_launches():
    """Every gpuopt kernel and torch's fused optimizer kernels replaced by no-ops."""
    from gpuopt import _launch
    from gpuopt.kernels import _multi_tensor, batch_norm

    saved = [(_launch, "_compiled_launches", _launch._compiled_launches),
             (_launch, "_current_device", _launch._current_device), (_launch, "_launchers", _launch._launchers)]
    _launch._compiled_launches, _launch._current_device, _launch._launchers = True, lambda: 0, {}
    for module in (_multi_tensor, batch_norm):
        for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _NoLaunch(getattr(module, name)))
    for name in ("_fused_adamw_", "_fused_adam_", "_fused_sgd_"):
        saved.append((torch, name, getattr(torch, name)))
        setattr(torch, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def median_us(fn, steps: int, before=None) -> float:
    """Median wall-clock µs of ``fn()``; ``before()`` runs untimed ahead of each call."""
    for _ in range(5):  # warm-up: first-step states, plans
        if before is not None:
            before()
        fn()
    times = []
    for _ in range(steps):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _shape_lists():
    def capped(shape):
        if math.prod(shape) <= CAP:
            return shape
        return (CAP,) if len(shape) == 1 else (CAP // 64, 64)
    return [("ResNet-50 (161 tensors)", resnet50_shapes()),
            ("GPT-2-medium (292 tensors)", [capped(s) for s in gpt2_medium_shapes()])]


@contextlib.contextmanager
def one_rank_group():
    """A 1-rank gloo process group for the block (unless one exists): DTensor parameters as FSDP2
    makes them, Shard(0), without other processes."""
    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if made:
            dist.destroy_process_group()


def optimizer_step_us(library: str, algorithm: str, shapes, moved: bool, steps: int, sharded: bool = False) -> float:
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grad_sets = [[torch.randn_like(p) for p in params] for _ in range(2 if moved else 1)]
    if sharded:  # FSDP2's DTensors (Shard(0) on a 1-rank mesh), gradients likewise
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (1,))
        params = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in params]
        grad_sets = [[distribute_tensor(g, mesh, [Shard(0)]) for g in grads] for grads in grad_sets]
    kwargs = dict(lr=1e-3) if algorithm == "AdamW" else dict(lr=0.1, momentum=0.9)
    if library == "gpuopt":
        import gpuopt
        opt = getattr(gpuopt, algorithm)(params, **kwargs)
    else:
        opt = getattr(torch.optim, algorithm)(params, fused=True, **kwargs)
    count = [0]

    def set_grads():  # the harness's part, untimed: backward would have made these
        grads = grad_sets[count[0] % len(grad_sets)]
        count[0] += 1
        for p, g in zip(params, grads):
            p.grad = g

    return median_us(opt.step, steps, before=set_grads)


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(grad), torch.empty(grad.shape[1]), torch.empty(grad.shape[1]), None, None


def batch_norm_us(impl: str, steps: int) -> float:
    import gpuopt

    x = torch.randn(2, 64, 4, 4, requires_grad=True)
    upstream = torch.randn_like(x)  # a dense gradient, as a ReLU or convolution above hands back
    bn = gpuopt.nn.BatchNorm2d(64)
    if impl == "gpuopt":
        fn = lambda: bn(x).backward(upstream)  # noqa: E731
    elif impl == "torch":  # torch's own module, for scale: its CPU kernels run (not stubbed)
        native = torch.nn.BatchNorm2d(64)
        fn = lambda: native(x).backward(upstream)  # noqa: E731
    else:
        empty = _Empty.apply
        fn = lambda: empty(x, bn.weight, bn.bias, bn.running_mean, bn.running_var).backward(upstream)  # noqa: E731
    return median_us(fn, steps)


def interleaved(measure: dict, rounds: int) -> dict:
    """``{name: µs}``: each measurement of ``measure`` ({name: () -> µs}) taken ``rounds`` times,
    alternating between them, keeping each one's least. A shared machine's noise only ever adds
    time, and alternating puts both sides of a ratio under the same spells of it."""
    best = {}
    for _ in range(rounds):
        for name, fn in measure.items():
            best[name] = min(best.get(name, float("inf")), fn())
    return best


def run(quick: bool = False, log=print) -> list[dict]:
    steps, rounds = (50, 1) if quick else (200, 5)
    rows = []
    with stubbed_launches():
        for case, shapes in _shape_lists():
            for algorithm in ("AdamW", "SGD"):
                for moved in (False, True):
                    us = interleaved({lib: (lambda lib=lib: optimizer_step_us(lib, algorithm, shapes, moved, steps))
                                      for lib in ("gpuopt", "torch")}, rounds)
                    rows.append(dict(case=case, op=algorithm + (" momentum" if algorithm == "SGD" else ""),
                                     grads="moved" if moved else "kept", gpuopt_us=us["gpuopt"],
                                     torch_us=us["torch"], reference="torch fused=True"))
                    log(f"  {rows[-1]}")
        for case, shapes in _shape_lists():
            for moved in (False, True):
                with one_rank_group():
                    us = interleaved({lib: (lambda lib=lib: optimizer_step_us(lib, "AdamW", shapes, moved, steps, True))
                                      for lib in ("gpuopt", "torch")}, rounds)
                rows.append(dict(case=case.split(" (")[0] + " DTensor", op="AdamW", grads="moved" if moved else "kept",
                                 gpuopt_us=us["gpuopt"], torch_us=us["torch"], reference="torch fused=True"))
                log(f"  {rows[-1]}")
        bn = interleaved({impl: (lambda impl=impl: batch_norm_us(impl, steps))
                          for impl in ("gpuopt", "empty", "torch")}, rounds)
        rows.append(dict(case="BatchNorm2d (2, 64, 4, 4)", op="forward+backward", grads="-", gpuopt_us=bn["gpuopt"],
                         torch_us=bn["empty"], reference="empty autograd.Function"))
        rows.append(dict(case="BatchNorm2d (2, 64, 4, 4)", op="forward+backward", grads="-", gpuopt_us=bn["gpuopt"],
                         torch_us=bn["torch"], reference="torch.nn.BatchNorm2d, its CPU compute included"))
    return rows


def print_host_table(rows: list[dict]) -> None:
    print(f"\nHost µs per step, launches stubbed ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()})")
    print(f"{'case':28} {'op':18} {'grads':6} {'gpuopt':>9} {'reference':>10} {'ratio':>6}  reference")
    for r in rows:
        print(f"{r['case']:28} {r['op']:18} {r['grads']:6} {r['gpuopt_us']:9.1f} {r['torch_us']:10.1f} "
              f"{r['gpuopt_us'] / r['torch_us']:6.2f}  {r['reference']}")
