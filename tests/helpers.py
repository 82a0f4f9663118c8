"""Shared test helpers: the tolerance table, one comparison that says where it failed, a poison
value, and a launch counter."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

# (rtol, atol) when a kernel that computes in fp32 is compared with a float64 oracle, by the
# dtype the result is stored in. bf16 keeps 8 bits of mantissa (rel. step 2^-8 = 3.9e-3), fp16 11.
TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.complex128: (1e-9, 1e-12),
    torch.complex64: (2e-5, 2e-6),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = torch.view_as_real(x.detach()) if x.is_complex() else x  # (re, im) pairs
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, dtype=None, rtol=None, atol=None, name="value"):
    """|actual - expected| <= atol + rtol |expected| everywhere, NaN where (and only where) the
    other has NaN. On failure, says how many elements fail, the worst one, and by how much."""
    if dtype is None:
        dtype = actual.dtype if isinstance(actual, torch.Tensor) else torch.float64
    default_rtol, default_atol = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if (nan_a != nan_e).any():
        where = np.argwhere(nan_a != nan_e)[0]
        raise AssertionError(f"{name}: NaN mismatch at index {tuple(where)}: got {a[tuple(where)]}, "
                             f"expected {e[tuple(where)]} ({(nan_a != nan_e).sum()} elements)")
    ok = nan_a | (np.abs(a - e) <= atol + rtol * np.abs(e)) | (a == e)
    if not ok.all():
        err = np.where(ok, 0.0, np.abs(a - e) - rtol * np.abs(e))
        worst = np.unravel_index(np.argmax(err), err.shape)
        abs_err = np.abs(a - e)[~ok]
        rel_err = (np.abs(a - e) / np.maximum(np.abs(e), 1e-300))[~ok]
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {a.size} elements differ beyond rtol={rtol}, atol={atol}; "
            f"worst at index {tuple(int(i) for i in worst)}: got {a[worst]!r}, expected {e[worst]!r}; "
            f"max abs err {abs_err.max():.3e}, max rel err {rel_err.max():.3e}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN, so an element a kernel forgets to write fails the check."""
    return t.fill_(float("nan"))


@contextlib.contextmanager
def count_launches(module, kernel_name: str):
    """Count launches of ``module.<kernel_name>`` inside the block: every launch goes through
    ``gpuopt._launch.launch`` (Triton's path or a cached launcher)."""
    from gpuopt import _launch

    kernel = getattr(module, kernel_name)
    counter = {"launches": 0}
    original = _launch.launch

    def counting(launched, *args, **kwargs):
        if launched is kernel:
            counter["launches"] += 1
        return original(launched, *args, **kwargs)

    _launch.launch = counting
    try:
        yield counter
    finally:
        _launch.launch = original


def run_in_child(code: str, **env) -> str:
    """Run ``code`` in a fresh Python (same environment and ``env``, same device); a crash is a failure."""
    from .conftest import DEVICE

    prelude = f"import torch, gpuopt\nDEVICE = torch.device({str(DEVICE)!r})\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, (f"child exited with {result.returncode}\nstdout:\n{result.stdout}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")
    return result.stdout


# 1 element, a prime, fewer elements than a block, several blocks, a channels-last conv weight.
ODD_SHAPES = [(1,), (131,), (7, 3), (300,), (4, 3, 5, 7)]


def odd_params(device, dtype=torch.float32):
    """Parameters of ``ODD_SHAPES``, the last one channels-last."""
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in ODD_SHAPES]
    params[4].data = params[4].data.to(memory_format=torch.channels_last)
    return params


def two_groups(params, **second):
    """Two param groups of ``params`` (its first two, then the rest with ``second``'s options)."""
    return [{"params": params[:2]}, {"params": params[2:], **second}]


def regression_task(device):
    """``(x, y, model)``: a fixed regression task (256 samples, 12 features, a tanh target with
    noise) and a small MLP for it, the same for every call."""
    torch.manual_seed(0)
    x, w_true = torch.randn(256, 12, device=device), torch.randn(12, 1, device=device)
    y = torch.tanh(x @ w_true) + 0.05 * torch.randn(256, 1, device=device)
    base = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    return x, y, base
