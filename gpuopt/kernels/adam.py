"""Adam and AdamW (seed B.0.1.4), every tensor of a group in one launch.

    m_t = β1 m_{t-1} + (1 - β1) g_t
    v_t = β2 v_{t-1} + (1 - β2) g_t²
    m̂_t = m_t / (1 - β1^t),  v̂_t = v_t / (1 - β2^t)
    W_t = W_{t-1} - η m̂_t / (sqrt(v̂_t) + ε)        (PyTorch; FLAGS.eps_inside_sqrt false)
    W_t = W_{t-1} - η m̂_t / sqrt(v̂_t + ε)          (the seed; FLAGS.eps_inside_sqrt)

Adam adds ``λ W`` to the gradient; AdamW (FLAGS.decoupled) multiplies W by ``1 - η λ`` first. AMSGrad
uses ``max(v̂)`` so far in place of v̂. Bytes per element (fp32): read W, g, m, v; write W, m, v = 28.
"""

import math

import triton
import triton.language as tl

from ._multi_tensor import (Algorithm, add_weight_decay, load_compute, load_grad, load_param, one_minus_pow, step_flags,
                            store_as, store_param)

ROLES = ("param", "grad", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")
HYPER = ("beta1", "one_minus_beta1", "log_beta1", "beta2", "one_minus_beta2", "log_beta2", "eps", "weight_decay")
AdamFlags = step_flags("AdamFlags", "amsgrad decoupled eps_inside_sqrt", __name__)


@triton.jit
def _adam_bias_corrections(step, lr, hyper, FLAGS: tl.constexpr):
    """Per tensor: 1 - β1^t and 1 - β2^t."""
    _, _, log_beta1, _, _, log_beta2, _, _ = hyper
    return one_minus_pow(log_beta1, step), one_minus_pow(log_beta2, step)


@triton.jit
def _adam_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, _, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr = ptrs
    beta1, one_minus_beta1, _, beta2, one_minus_beta2, _, eps, weight_decay = hyper
    bias_correction1, bias_correction2 = scalars
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize)
    if FLAGS.decoupled:
        w = w * (1.0 - lr * weight_decay)
    else:
        g = add_weight_decay(g, w, weight_decay)
    m = beta1 * load_compute(exp_avg_ptr + offsets, mask) + one_minus_beta1 * g
    v = beta2 * load_compute(exp_avg_sq_ptr + offsets, mask) + one_minus_beta2 * g * g
    store_as(exp_avg_ptr + offsets, m, mask)
    store_as(exp_avg_sq_ptr + offsets, v, mask)
    if FLAGS.amsgrad:
        v = tl.maximum(load_compute(max_exp_avg_sq_ptr + offsets, mask), v)
        store_as(max_exp_avg_sq_ptr + offsets, v, mask)
    if FLAGS.eps_inside_sqrt:
        denom = tl.sqrt(v / bias_correction2 + eps)
    else:
        denom = tl.sqrt(v) / tl.sqrt(bias_correction2) + eps
    w = w - (lr / bias_correction1) * m / denom
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def moment_hyperparameters(beta1, beta2) -> dict:
    """β, 1 - β and log β of both moments (for 1 - β^t without cancellation), in float64 on the
    host; log 0 = -inf makes 1 - 0^t = 1. Tensor betas (torch accepts them) are read on the host:
    free for a CPU tensor, a sync for a device one."""
    beta1, beta2 = float(beta1), float(beta2)
    for index, beta in enumerate((beta1, beta2)):  # (also when set in a param group mid-run)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}; gpuopt takes betas in [0, 1), as "
                             "torch.optim.Adam's constructor does (its bias correction 1 - β^t is computed from log β)")
    log_beta1 = math.log(beta1) if beta1 > 0 else float("-inf")
    log_beta2 = math.log(beta2) if beta2 > 0 else float("-inf")
    return dict(beta1=beta1, one_minus_beta1=1.0 - beta1, log_beta1=log_beta1, beta2=beta2,
                one_minus_beta2=1.0 - beta2, log_beta2=log_beta2)


def _hyperparameters(*, beta1, beta2, eps, weight_decay, amsgrad, maximize, eps_inside_sqrt, decoupled_weight_decay):
    return (dict(moment_hyperparameters(beta1, beta2), eps=eps, weight_decay=weight_decay),
            dict(amsgrad=amsgrad, maximize=maximize, decoupled=decoupled_weight_decay, eps_inside_sqrt=eps_inside_sqrt))


def _states(options) -> tuple:
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if options["amsgrad"] else ("exp_avg", "exp_avg_sq")


ADAM = Algorithm(ROLES, HYPER, _adam_update, AdamFlags, _hyperparameters, per_tensor=_adam_bias_corrections,
                 states=_states)
