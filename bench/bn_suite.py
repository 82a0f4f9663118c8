"""Batch-norm suite: training forward, forward + backward and eval forward, gpuopt against
torch.nn.functional.batch_norm (cuDNN or PyTorch's native kernels, whichever torch picks — the
table says which) and a torch.compile'd batch norm."""

from __future__ import annotations

import gc
import math
import time

import torch
import torch.nn.functional as F

import gpuopt

from . import cupy_baseline
from .common import Row

SHAPES = [(256, 64, 56, 56), (256, 256, 14, 14), (256, 2048, 7, 7), (128, 128, 28, 28), (8, 64, 16, 64, 64),
          (8192, 4096), (65536, 1024)]
QUICK_SHAPES = [(256, 64, 56, 56), (256, 2048, 7, 7), (8192, 4096)]
TINY_SHAPES = [(4, 8, 6, 6), (2, 4, 3, 4, 5), (64, 32)]  # the interpreter: only to show the bench runs

# Passes over the data (DESIGN.md): statistics read x; normalize read x, write y; backward
# reduction read x, dY; backward elementwise read x, dY, write dZ. Eval: read x, write y.
PASSES = {"train fwd": 3, "train fwd+bwd": 8, "eval fwd": 2}


def layouts(shape):
    if len(shape) == 2:
        return [("2-D", torch.contiguous_format)]
    cl = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return [("NCHW", torch.contiguous_format), ("NHWC", cl)]


def torch_backend(x, w, b, rm, rv) -> str:
    """Which kernels F.batch_norm ran: cuDNN or PyTorch's native ones (from the profiler's names)."""
    if not x.is_cuda:
        return "native CPU"
    from torch.profiler import ProfilerActivity, profile

    xi = x.detach().requires_grad_()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.batch_norm(xi, rm, rv, w, b, True, 0.1, 1e-5).backward(torch.ones_like(x))
        torch.cuda.synchronize()
    names = " ".join(e.key for e in prof.key_averages()).lower()
    return "cuDNN" if ("cudnn" in names or "bn_fw" in names or "bn_bw" in names) else "native"


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(timer, copy_gbps: float, gpu: bool, quick: bool, log=print, compile=True) -> list[Row]:
    device = "cuda" if gpu else "cpu"
    shapes = QUICK_SHAPES if quick and gpu else (SHAPES if gpu else TINY_SHAPES)
    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16]
    rows = []
    for shape in shapes:
        C, numel = shape[1], math.prod(shape)
        for dtype in dtypes:
            for layout_name, memory_format in layouts(shape):
                log(f"  bn: {shape} {dtype} {layout_name}")
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
                dy = torch.randn_like(x)
                w = torch.rand(C, device=device, requires_grad=True)
                b = torch.randn(C, device=device, requires_grad=True)
                rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
                backend = torch_backend(x, w, b, rm, rv)
                implementations = [("gpuopt", gpuopt.functional.batch_norm, ""),
                                   (f"torch F.batch_norm ({backend})", F.batch_norm, "")]
                if cupy_baseline.available(gpu) and cupy_baseline.supports(dtype):
                    implementations.append(("CuPy Elementwise/ReductionKernel", cupy_baseline.batch_norm,
                                            "hand-written CUDA C, 2 reductions + 1 elementwise each way"))
                if gpu and compile:
                    start = time.perf_counter()
                    compiled = torch.compile(F.batch_norm, dynamic=False)
                    compiled(x.detach().requires_grad_(), rm, rv, w, b, True, 0.1, 1e-5).backward(dy)
                    torch.cuda.synchronize()
                    implementations.append(("torch.compile(F.batch_norm)", compiled,
                                            f"compile {time.perf_counter() - start:.1f} s, not in the time"))
                for op, passes in PASSES.items():
                    for impl, fn, note in implementations:
                        if impl.startswith("CuPy") and op == "eval fwd":
                            continue  # (the baseline is the training batch norm)
                        rows.append(Row("bn", "×".join(map(str, shape)), op, str(dtype).replace("torch.", ""),
                                        layout_name, impl, _time(timer, op, fn, x, dy, w, b, rm, rv),
                                        passes * numel * x.element_size(), copy_gbps, note))
                del x, dy, implementations
                torch._dynamo.reset()
                _free()
    return rows


def _time(timer, op, fn, x, dy, w, b, rm, rv):
    if op == "eval fwd":
        with torch.no_grad():
            return timer(lambda: fn(x, rm, rv, w, b, False, 0.1, 1e-5))
    if op == "train fwd":
        with torch.no_grad():
            return timer(lambda: fn(x, rm, rv, w, b, True, 0.1, 1e-5))
    xi = x.detach().requires_grad_()

    def forward_backward():
        xi.grad = w.grad = b.grad = None
        fn(xi, rm, rv, w, b, True, 0.1, 1e-5).backward(dy)

    return timer(forward_backward)
