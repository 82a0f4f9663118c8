"""Adadelta (Zeiler's, as torch.optim.Adadelta; the seed's "adadelta" is RMSprop), one launch:

    g     = g + λ W
    E[g²] = ρ E[g²] + (1 - ρ) g²
    Δ     = sqrt(E[Δ²] + ε) / sqrt(E[g²] + ε) · g
    E[Δ²] = ρ E[Δ²] + (1 - ρ) Δ²
    W    -= η Δ

Bytes per element (fp32): read W, g, E[g²], E[Δ²]; write W, E[g²], E[Δ²] = 28.
"""

import triton
import triton.language as tl

from ._multi_tensor import (Algorithm, add_weight_decay, load_compute, load_grad, load_param, step_flags, store_as,
                            store_param)

ROLES = ("param", "grad", "step", "square_avg", "acc_delta", "master")
HYPER = ("rho", "one_minus_rho", "eps", "weight_decay")
AdadeltaFlags = step_flags("AdadeltaFlags", "", __name__)


@triton.jit
def _adadelta_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, _, square_avg_ptr, acc_delta_ptr, master_ptr = ptrs
    rho, one_minus_rho, eps, weight_decay = hyper
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = add_weight_decay(load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize),
                         w, weight_decay)
    square_avg = rho * load_compute(square_avg_ptr + offsets, mask) + one_minus_rho * g * g
    acc_delta = load_compute(acc_delta_ptr + offsets, mask)
    delta = tl.sqrt(acc_delta + eps) / tl.sqrt(square_avg + eps) * g
    store_as(square_avg_ptr + offsets, square_avg, mask)
    store_as(acc_delta_ptr + offsets, rho * acc_delta + one_minus_rho * delta * delta, mask)
    store_param(param_ptr, master_ptr, offsets, mask, w - lr * delta, seed, FLAGS.has_master,
                FLAGS.stochastic_rounding)


def _hyperparameters(*, rho, eps, weight_decay, maximize):
    return dict(rho=rho, one_minus_rho=1.0 - rho, eps=eps, weight_decay=weight_decay), dict(maximize=maximize)


def _states(options) -> tuple:
    return ("square_avg", "acc_delta")


ADADELTA = Algorithm(ROLES, HYPER, _adadelta_update, AdadeltaFlags, _hyperparameters, states=_states)
