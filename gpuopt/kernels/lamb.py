"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"), as apex's ``FusedLAMB``
with ``adam_w_mode=True`` and no clipping of its own, every tensor of a group in two launches:

    m_t = β1 m_{t-1} + (1 - β1) g_t
    v_t = β2 v_{t-1} + (1 - β2) g_t²
    u_t = m̂_t / (sqrt(v̂_t) + ε) + λ W_{t-1}        (m̂, v̂ bias-corrected when ``bias_correction``)
    r_t = ‖W_{t-1}‖ / ‖u_t‖  per tensor (1 when either norm is 0; at most ``max_trust_ratio``)
    W_t = W_{t-1} - η r_t u_t

The trust ratio needs two whole-tensor norms before any weight moves: the first launch
(``_lamb_norms``) updates m and v and returns each block's Σ W² and Σ u², which the walk folds per
tensor; the second (``_lamb_update``) computes u again from the stored m, v and moves W. Bytes per
element (fp32): read W, g, m, v, write m, v; then read W, m, v, write W = 40 (Adam's one pass: 28).
"""

import triton
import triton.language as tl

from ._multi_tensor import (Algorithm, load_compute, load_grad, load_param, masked_sum_of_squares, one_minus_pow,
                            step_flags, store_as, store_param)
from .adam import moment_hyperparameters

ROLES = ("param", "grad", "step", "exp_avg", "exp_avg_sq", "master")
HYPER = ("beta1", "one_minus_beta1", "log_beta1", "beta2", "one_minus_beta2", "log_beta2", "eps", "weight_decay",
         "max_trust_ratio")
SUMS = ("param_sq", "update_sq")
LambFlags = step_flags("LambFlags", "bias_correction", __name__)


@triton.jit
def _lamb_bias_corrections(step, lr, hyper, FLAGS: tl.constexpr):
    """Per tensor: 1 - β1^t and 1 - β2^t (1 and 1 without bias correction)."""
    _, _, log_beta1, _, _, log_beta2, _, _, _ = hyper
    if FLAGS.bias_correction:
        return one_minus_pow(log_beta1, step), one_minus_pow(log_beta2, step)
    else:
        return tl.full([], 1.0, step.dtype), tl.full([], 1.0, step.dtype)


@triton.jit
def _lamb_direction(w, m, v, bias_correction1, bias_correction2, eps, weight_decay):
    """u = m̂ / (sqrt(v̂) + ε) + λ W."""
    return (m / bias_correction1) / (tl.sqrt(v / bias_correction2) + eps) + weight_decay * w


@triton.jit
def _lamb_norms(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, _, exp_avg_ptr, exp_avg_sq_ptr, master_ptr = ptrs
    beta1, one_minus_beta1, _, beta2, one_minus_beta2, _, eps, weight_decay, _ = hyper
    bias_correction1, bias_correction2 = scalars
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize)
    m = beta1 * load_compute(exp_avg_ptr + offsets, mask) + one_minus_beta1 * g
    v = beta2 * load_compute(exp_avg_sq_ptr + offsets, mask) + one_minus_beta2 * g * g
    store_as(exp_avg_ptr + offsets, m, mask)
    store_as(exp_avg_sq_ptr + offsets, v, mask)
    u = _lamb_direction(w, m, v, bias_correction1, bias_correction2, eps, weight_decay)
    return masked_sum_of_squares(w, mask), masked_sum_of_squares(u, mask)


@triton.jit
def _lamb_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, _, _, exp_avg_ptr, exp_avg_sq_ptr, master_ptr = ptrs
    _, _, _, _, _, _, eps, weight_decay, max_trust_ratio = hyper
    bias_correction1, bias_correction2, param_sq, update_sq = scalars
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    m = load_compute(exp_avg_ptr + offsets, mask)
    v = load_compute(exp_avg_sq_ptr + offsets, mask)
    u = _lamb_direction(w, m, v, bias_correction1, bias_correction2, eps, weight_decay)
    both = (param_sq > 0.0) & (update_sq > 0.0)
    ratio = tl.where(both, tl.sqrt(param_sq) / tl.sqrt(tl.where(both, update_sq, 1.0)), 1.0)
    w = w - lr * tl.minimum(ratio, max_trust_ratio) * u
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def _hyperparameters(*, beta1, beta2, eps, weight_decay, bias_correction, max_trust_ratio, maximize):
    cap = float("inf") if max_trust_ratio is None else float(max_trust_ratio)
    return (dict(moment_hyperparameters(beta1, beta2), eps=eps, weight_decay=weight_decay, max_trust_ratio=cap),
            dict(bias_correction=bias_correction, maximize=maximize))


def _states(options) -> tuple:
    return ("exp_avg", "exp_avg_sq")


LAMB = Algorithm(ROLES, HYPER, _lamb_update, LambFlags, _hyperparameters, per_tensor=_lamb_bias_corrections,
                 states=_states, norms=_lamb_norms, sums=SUMS)
