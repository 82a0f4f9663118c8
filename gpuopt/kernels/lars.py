"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"), SGD with momentum and a
per-tensor learning-rate scale, every tensor of a group in two launches:

    local = tc ‖W‖ / (‖g‖ + λ ‖W‖ + ε)   per tensor (1 when ‖W‖ or ‖g‖ is 0)
    d     = local (g + λ W)
    buf   = μ buf + d                      (buf = d at the first step)
    W     = W - η buf

The scale needs both norms before any weight moves: the first launch (``_lars_norms``) reads W and
g and returns each block's Σ W² and Σ g², which the walk folds per tensor; the second
(``_lars_update``) is SGD's momentum step with the scale. "First step" is per tensor, as SGD's:
its ``step`` is still 0. Bytes per element (fp32): read W, g; then read W, g, buf, write W, buf = 28.
"""

import triton
import triton.language as tl

from ._multi_tensor import (Algorithm, add_weight_decay, load_grad, load_param, load_unless_new, masked_sum_of_squares,
                            step_flags, store_as, store_param)

ROLES = ("param", "grad", "step", "momentum_buffer", "master")
HYPER = ("momentum", "weight_decay", "trust_coefficient", "eps")
SUMS = ("param_sq", "grad_sq")
LarsFlags = step_flags("LarsFlags", "has_momentum", __name__)


@triton.jit
def _lars_norms(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, _, _, master_ptr = ptrs
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize)
    return masked_sum_of_squares(w, mask), masked_sum_of_squares(g, mask)


@triton.jit
def _lars_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, _, momentum_buffer_ptr, master_ptr = ptrs
    momentum, weight_decay, trust_coefficient, eps = hyper
    step, param_sq, grad_sq = scalars
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize)
    param_norm, grad_norm = tl.sqrt(param_sq), tl.sqrt(grad_sq)
    both = (param_sq > 0.0) & (grad_sq > 0.0)
    denominator = tl.where(both, grad_norm + weight_decay * param_norm + eps, 1.0)
    local = tl.where(both, trust_coefficient * param_norm / denominator, 1.0)
    d = local * add_weight_decay(g, w, weight_decay)
    if FLAGS.has_momentum:  # a new buffer (its tensor's step 1) takes buf = d
        d = momentum * load_unless_new(momentum_buffer_ptr, offsets, mask, step != 1.0) + d
        store_as(momentum_buffer_ptr + offsets, d, mask)
    store_param(param_ptr, master_ptr, offsets, mask, w - lr * d, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def _hyperparameters(*, momentum, weight_decay, trust_coefficient, eps, maximize):
    return (dict(momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps),
            dict(has_momentum=momentum != 0, maximize=maximize))


def _states(options) -> tuple:
    return ("momentum_buffer",) if options["momentum"] != 0 else ()


def _uses_step(options) -> bool:
    return options["momentum"] != 0


LARS = Algorithm(ROLES, HYPER, _lars_update, LarsFlags, _hyperparameters, states=_states, uses_step=_uses_step,
                 norms=_lars_norms, sums=SUMS)
