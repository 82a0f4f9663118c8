"""CuPy: gpuopt's functional API and EMA on CuPy arrays (in place, on the caller's CuPy stream),
and the float64 oracle (gpuopt.reference) running in CuPy at GPU sizes. Needs a GPU and CuPy
(the GPU machine has cupy-cuda13x); skipped otherwise, with the reason."""

import math

import numpy as np
import pytest
import torch

import gpuopt
from gpuopt import functional as F
from gpuopt import reference

from .conftest import HAS_GPU
from .helpers import assert_close

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (optional: pip install cupy-cuda13x)")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="CuPy arrays need a CUDA GPU")]


def test_adam_on_cupy_arrays_on_a_side_stream_equals_the_oracle():
    """Arrays made on a non-default CuPy stream, stepped there: the launches follow the CuPy work
    that made the inputs (an ExternalStream of the caller's stream), and the CuPy work queued
    after reads the result."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        rng = cupy.random.default_rng(0)
        params = [rng.standard_normal(s, dtype=cupy.float32) for s in ((1000, 37), (4099,))]
        grads = [rng.standard_normal(p.shape, dtype=cupy.float32) for p in params]
        start = [p.copy() for p in params]
        exp_avgs = [cupy.zeros_like(p) for p in params]
        exp_avg_sqs = [cupy.zeros_like(p) for p in params]
        steps = [cupy.zeros(1, cupy.float32) for _ in params]
        addresses = [p.data.ptr for p in params]
        F.adamw(params, grads, exp_avgs, exp_avg_sqs, None, steps, lr=0.01, weight_decay=0.1)
        after = [p * 1.0 for p in params]  # queued after the step on the same stream
    stream.synchronize()
    assert [p.data.ptr for p in params] == addresses and all(isinstance(p, cupy.ndarray) for p in params)
    for p0, g, result in zip(start, grads, after):
        W, state = reference.torch_adam_step(p0, g, None, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
        assert isinstance(W, cupy.ndarray)  # the oracle ran in CuPy, in float64
        assert_close(torch.from_dlpack(result), torch.from_dlpack(W), dtype=torch.float32, name="AdamW on CuPy")


def test_batch_norm_and_ema_on_cupy_arrays():
    x = cupy.random.default_rng(1).standard_normal((8, 16, 7, 7), dtype=cupy.float32) * 3 + 2
    mean, var = cupy.zeros(16, cupy.float32), cupy.ones(16, cupy.float32)
    y = F.batch_norm(x, mean, var, training=True)
    assert isinstance(y, cupy.ndarray) and y.shape == x.shape
    Z = cupy.moveaxis(x, 1, 0).reshape(16, -1)
    Z_hat, _ = reference.batch_norm_forward(Z)
    assert_close(torch.from_dlpack(cupy.moveaxis(y, 1, 0).reshape(16, -1)), torch.from_dlpack(Z_hat),
                 dtype=torch.float32, rtol=1e-4, atol=1e-4, name="batch norm on CuPy")
    params = [cupy.ones(10, cupy.float32), cupy.zeros((3, 3), cupy.float32)]
    ema = gpuopt.EMA(params, decay=0.5)
    for p in params:
        p += 2.0
    ema.update()
    assert all(isinstance(a, cupy.ndarray) for a in ema.averages)
    assert float(ema.averages[0][0]) == 2.0 and float(ema.averages[1][0, 0]) == 1.0


def test_oracle_in_cupy_at_gpu_sizes():
    """The kernels against the seed's equations at a real model's size, the float64 oracle running
    in CuPy: one AdamW step over GPT-2 medium's 355M parameters (flat), and batch norm forward +
    backward on (256, 64, 56, 56)."""
    n = 354_823_168
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(n, device="cuda", generator=gen)
    g = torch.randn(n, device="cuda", generator=gen)
    start = cupy.asarray(p).copy()
    opt = gpuopt.AdamW([torch.nn.Parameter(p)], lr=1e-3, weight_decay=0.1)
    opt.param_groups[0]["params"][0].grad = g
    opt.step()
    W, _ = reference.torch_adam_step(start, cupy.asarray(g), None, lr=1e-3, weight_decay=0.1,
                                     decoupled_weight_decay=True)
    error = cupy.abs(cupy.asarray(opt.param_groups[0]["params"][0].detach()) - W) / (cupy.abs(W) + 1e-6)
    assert float(error.max()) < 1e-5, float(error.max())
    del W, start, error, opt, p, g
    x = torch.randn(256, 64, 56, 56, device="cuda", generator=gen, requires_grad=True)
    dy = torch.randn_like(x)
    y = gpuopt.functional.batch_norm(x, None, None, training=True)
    y.backward(dy)
    Z = cupy.asarray(x.detach()).transpose(1, 0, 2, 3).reshape(64, -1)
    Z_hat, cache = reference.batch_norm_forward(Z)
    dZ, _, _ = reference.batch_norm_backward(cupy.asarray(dy).transpose(1, 0, 2, 3).reshape(64, -1), cache)
    to_z = lambda t: cupy.asarray(t.detach()).transpose(1, 0, 2, 3).reshape(64, -1)  # noqa: E731
    assert float(cupy.abs(to_z(y) - Z_hat).max()) < 1e-4
    assert float(cupy.abs(to_z(x.grad) - dZ).max()) < 1e-4
    assert math.isfinite(float(dZ.sum())) and isinstance(dZ, cupy.ndarray) and not isinstance(dZ, np.ndarray)
