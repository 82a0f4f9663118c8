"""The seed's running average (B.0.1.1) over a list of tensors, in one launch.

    C_t = γ_t C_{t-1} + (1 - γ_t) c_t

``C`` are the averages (``gpuopt.EMA`` keeps them), ``c_t`` the current values (a model's
weights). ``γ_t`` is a runtime argument: a constant decay, or ``(t-1)/t`` for the exact mean.
Bytes per element: read C and c, write C.
"""

import triton
import triton.language as tl

from .. import _launch
from ._multi_tensor import float64_variant, hyper, load_compute, schedule_entry, store_as, tensor_ptr

ROLES = ("average", "value")
AVERAGE, VALUE = tl.constexpr(0), tl.constexpr(1)  # rows of the offsets table


@triton.jit
def _ema_block(average_ptr, value_ptr, offsets, mask, gamma, one_minus_gamma):
    C = load_compute(average_ptr + offsets, mask)
    c = load_compute(value_ptr + offsets, mask)
    # γ C + (1-γ) c rather than C + (1-γ)(c - C): with γ_1 = 0 the first average is exactly c.
    store_as(average_ptr + offsets, gamma * C + one_minus_gamma * c, mask)


@triton.jit
def _ema_kernel(block_tensor_ptr, block_start_ptr, numel_ptr, offsets_ptr, n_blocks, n_tensors,
                average_base_ptr, value_base_ptr, gamma, one_minus_gamma,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    gamma, one_minus_gamma = hyper(gamma, average_base_ptr), hyper(one_minus_gamma, average_base_ptr)
    for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        t, offsets, full, numel = schedule_entry(i, block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
        average_ptr = tensor_ptr(average_base_ptr, offsets_ptr, AVERAGE, t, n_tensors, ALIGNED)
        value_ptr = tensor_ptr(value_base_ptr, offsets_ptr, VALUE, t, n_tensors, ALIGNED)
        if full:
            _ema_block(average_ptr, value_ptr, offsets, None, gamma, one_minus_gamma)
        else:
            _ema_block(average_ptr, value_ptr, offsets, offsets < numel, gamma, one_minus_gamma)


_ema_f64_kernel = float64_variant(_ema_kernel, ("gamma", "one_minus_gamma"))


def ema_(plan, gamma: float):
    """Launch: every average in ``plan`` ← γ·average + (1-γ)·value. ``plan`` is a LaunchPlan
    whose roles are ``ROLES``; its tensors are updated in place."""
    _launch.launch(_ema_f64_kernel if plan.float64 else _ema_kernel, plan.grid,
                   (*plan.schedule_args(), *plan.bases(), float(gamma), float(1.0 - gamma)),
                   dict(ALIGNED=plan.aligned, BLOCK=plan.block), plan.num_warps)
