"""The seed's running average (B.0.1.1) over a list of tensors, in one launch.

    C_t = γ_t C_{t-1} + (1 - γ_t) c_t

``C`` are the averages (``gpuopt.EMA`` keeps them), ``c_t`` the current values (a model's
weights). ``γ_t`` is a runtime argument: a constant decay, or ``(t-1)/t`` for the exact mean.
Bytes per element: read C and c, write C.
"""

import triton
import triton.language as tl

from ._multi_tensor import Algorithm, load_compute, store_as

ROLES = ("average", "value")
HYPER = ("gamma", "one_minus_gamma")


@triton.jit
def _ema_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    average_ptr, value_ptr = ptrs
    gamma, one_minus_gamma = hyper
    C = load_compute(average_ptr + offsets, mask)
    c = load_compute(value_ptr + offsets, mask)
    # γ C + (1-γ) c rather than C + (1-γ)(c - C): with γ_1 = 0 the first average is exactly c.
    store_as(average_ptr + offsets, gamma * C + one_minus_gamma * c, mask)


def _hyperparameters(*, gamma):
    return dict(gamma=gamma, one_minus_gamma=1.0 - gamma), None


def _no_step(options) -> bool:
    return False


AVERAGE = Algorithm(ROLES, HYPER, _ema_update, None, _hyperparameters, uses_step=_no_step)
